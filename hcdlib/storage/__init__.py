"""Storage: locations as URIs (local or S3), one listing pass, slides staged on a node's disk."""
