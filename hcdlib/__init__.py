"""hcd: histopathologic cancer detection at archive scale."""
