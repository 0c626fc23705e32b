"""Labels CSVs and labelled sources: what is read as 0 and 1, and what is refused naming the row."""


import pytest
from conftest import csv_file

from hcdlib.commands.evaluate.metrics import load_labels
from hcdlib.commands.pack import PackConfig, pack
from hcdlib.commands.train.data import open_sources
from hcdlib.commands.train.run import TrainConfig
from hcdlib.sources.factory import open_source
from hcdlib.sources.labels import check_labelled, read_labels
from hcdlib.storage.listing import SourceError


def test_labels_csv_without_label_column_is_refused(ten_patches, tmp_path, no_ray):
    folder, ids = ten_patches
    bad = csv_file(tmp_path / "nolabel.csv", "id,slide_id\n" + "".join(f"{i},s\n" for i in ids))
    with pytest.raises(SourceError, match=r"nolabel.csv: labels CSV needs a 'label' column"):
        read_labels(bad)
    with pytest.raises(SourceError, match="needs a 'label' column"):
        open_sources(TrainConfig(data=str(folder), labels=bad, out=str(tmp_path / "run")))
    with pytest.raises(SourceError, match="needs a 'label' column"):
        load_labels(bad)
    from hcdlib.commands.pack import PackConfig, pack

    with pytest.raises(SourceError, match="needs a 'label' column"):  # it packed every row with no label
        pack(PackConfig(input=str(folder), labels=bad, out=str(tmp_path / "packed")))
    assert not (tmp_path / "run").exists() and not (tmp_path / "packed").exists()
    read_labels(bad, require_label=False)  # scoring may carry slide ids without labels


@pytest.mark.parametrize("value", ["2", "-1", "0.5", "positive", "tumours", "", "1.01", "10", "01"])
def test_label_that_is_not_0_or_1_is_refused_naming_row_and_value(ten_patches, tmp_path, value):
    folder, ids = ten_patches
    rows = [f"{i},{1 if n % 2 else 0}\n" for n, i in enumerate(ids)]
    rows[3] = f"{ids[3]},{value}\n"
    bad = csv_file(tmp_path / "labels.csv", "id,label\n" + "".join(rows))
    with pytest.raises(SourceError, match=rf"labels.csv: row 5: label '{value}' for id '{ids[3]}' is not 0 or 1"):
        read_labels(bad)
    with pytest.raises(SourceError, match="row 5"):
        pack(PackConfig(input=str(folder), labels=bad, out=str(tmp_path / "shards")))
    assert not (tmp_path / "shards").exists()  # refused before any shard was written


def test_labels_written_as_floats_or_class_names_are_read_as_0_and_1(tmp_path):
    """0.0 / 1.0 (pandas writes a label column with a gap in it so) and Tumor / Normal (CAMELYON16's words).

    Each is the same label as 1 or 0.
    """
    path = csv_file(tmp_path / "labels.csv",
                    "id,label\na,0.0\nb,1.0\nc, 1 \nd,1.000\ne,0\nf,Tumor\ng,normal\nh,TUMOUR\n")
    assert read_labels(path)["label"].to_pylist() == [0, 1, 1, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("text", [
    "ID,Label,Slide_ID\n007,1,s1\n008,0,s2\n",                   # a spreadsheet's capitals
    "\ufeffid;label;slide_id\r\n007;1;s1\r\n008;0;s2\r\n",       # Excel's UTF-8 export in a comma-decimal locale
    '"id"\t"label"\t"slide_id"\n"007"\t"1"\ts1\n008\t0\ts2\n',    # tab-separated, quoted
])
def test_labels_csv_from_a_spreadsheet_is_read(tmp_path, text):
    """Each of these was refused for want of an 'id' column; ids keep their leading zeros."""
    t = read_labels(csv_file(tmp_path / "labels.csv", text))
    assert t.select(["id", "label", "slide_id"]).to_pylist() == [{"id": "007", "label": 1, "slide_id": "s1"},
                                                                 {"id": "008", "label": 0, "slide_id": "s2"}]
    with pytest.raises(SourceError, match=r"needs an 'id' column, has \['image_id', 'label'\]"):
        read_labels(csv_file(tmp_path / "other.csv", "image_id,label\na,1\n"))
    # CAMELYON16's reference.csv has no header: its first row was taken for one
    with pytest.raises(SourceError, match=r"has \['test_001', 'Tumor', 'Macro'\]; its first line names the columns "
                                          r"\(id,label\[,slide_id\]\): add that line if the file starts with data"):
        read_labels(csv_file(tmp_path / "reference.csv", "test_001,Tumor,Macro\ntest_002,Normal,\n"))


def test_ids_written_with_the_file_extension_name_the_same_patches(ten_patches, tmp_path):
    """A CSV made from a file listing has abc.tif where hcd's id is abc: every patch went unlabelled."""
    folder, ids = ten_patches
    rows = "".join(f"{i}{'.tif' if n % 3 else '.TIFF'},{n % 2}\n" for n, i in enumerate(ids))
    path = csv_file(tmp_path / "labels.csv", "id,label\n" + rows + "x.png.jpg,1\n")
    t = read_labels(path)
    assert t["id"].to_pylist() == [*ids, "x.png"] and t["label"].to_pylist() == [*(n % 2 for n in range(len(ids))), 1]
    src = open_source(str(folder), path, require_label=True)
    assert check_labelled(src, "training")["label"].to_pylist() == [n % 2 for n in range(len(ids))]
    both = csv_file(tmp_path / "both.csv", f"id,label\n{ids[0]},0\n{ids[0]}.tif,0\n")
    with pytest.raises(SourceError, match=rf"listed more than once, e.g. '{ids[0]}' on rows 2, 3"):
        read_labels(both)


def test_id_listed_twice_is_refused(ten_patches, tmp_path):
    folder, ids = ten_patches
    bad = csv_file(tmp_path / "dup.csv", "id,label\n" + "".join(f"{i},0\n" for i in ids) + f"{ids[2]},1\n")
    with pytest.raises(SourceError, match=rf"listed more than once, e.g. '{ids[2]}' on rows 4, 12"):
        pack(PackConfig(input=str(folder), labels=bad, out=str(tmp_path / "shards")))
    with pytest.raises(SourceError, match="more than once"):
        load_labels(bad)
