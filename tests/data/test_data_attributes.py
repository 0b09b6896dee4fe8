"""Attributes from the user's labels: CelebA's ``list_attr_celeba.txt`` layout and CSVs (each bad
table named by file and line), a folder's classes one-hot, rows matched to image files, and an
attribute named or numbered."""

import pytest
import torch

from diffusion_apps.data.attributes import (
    attribute_index,
    folder_attributes,
    match_attributes,
    read_attribute_table,
)
from diffusion_apps.data.files import ImageFiles

CELEBA = "Smiling  Male Young\n000001.jpg  1 -1  1\n000002.jpg -1  1 -1\n000003.jpg  1  1  1\n"
EXPECTED = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1]])
NAMES = ("Smiling", "Male", "Young")
FILES = ("000001.jpg", "000002.jpg", "000003.jpg")


def table(tmp_path, text: str, name: str = "list_attr_celeba.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("count", ["", "3\n"], ids=["no-count", "count-line"])
def test_the_celeba_layout_is_read_with_or_without_its_count_line(tmp_path, count):
    attributes = read_attribute_table(table(tmp_path, count + CELEBA))
    assert attributes.names == NAMES and attributes.files == FILES
    assert torch.equal(attributes.values, EXPECTED)


@pytest.mark.parametrize(
    "text",
    [
        "image_id,Smiling,Male,Young\n000001.jpg,1,-1,1\n000002.jpg,-1,1,-1\n000003.jpg,1,1,1\n",
        "Smiling, file ,Male,Young\n1,000001.jpg,0,1\n0,000002.jpg,1,0\n\n1,000003.jpg,1,1\n",
    ],
    ids=["image_id-pm1", "file-column-second-01"],
)
def test_a_csv_is_read_with_0_1_or_pm1_values(tmp_path, text):
    attributes = read_attribute_table(table(tmp_path, text, "attributes.csv"))
    assert attributes.names == NAMES and attributes.files == FILES
    assert torch.equal(attributes.values, EXPECTED)


@pytest.mark.parametrize(
    "text, name, named",
    [
        ("Smiling Male\na.jpg 1 -1\nb.jpg 1\n", "t.txt", "line 3: 1 values for 2 attributes"),
        ("Smiling Male\na.jpg 1 yes\n", "t.txt", "line 2: Male is 'yes', not 1, -1 or 0"),
        ("file,Smiling\na.jpg,2\n", "t.csv", "line 2: Smiling is '2', not 1, -1 or 0"),
        ("A\na.jpg 1\nb.jpg 0\na.jpg -1\n", "t.txt", "line 4: a.jpg is listed again .*line 2"),
        ("file\na.jpg\n", "t.csv", "line 1: no attribute columns"),
        ("2\nA\na.jpg 1\n", "t.txt", "line 1: the count line says 2 images, but .* 1 rows"),
        ("name,Smiling\na.jpg,1\n", "t.csv", "line 1: no 'file' \\(or 'image_id'\\) column"),
        ("A A\na.jpg 1 1\n", "t.txt", "line 1: attributes named twice: A"),
        ("A B\n", "t.txt", "no rows after the attribute names"),
        ("\n\n", "t.txt", "is empty"),
    ],
    ids=[
        "values",
        "not-pm1",
        "csv-2",
        "duplicate",
        "no-columns",
        "count",
        "no-file-column",
        "names-twice",
        "no-rows",
        "empty",
    ],  # fmt: skip
)
def test_a_bad_table_is_named_by_file_and_line(tmp_path, text, name, named):
    path = table(tmp_path, text, name)
    with pytest.raises(ValueError, match=f"{path}.*{named}"):
        read_attribute_table(path)


def test_folder_classes_become_one_hot_attributes():
    attributes = folder_attributes([1, 0, 2, 1], ("cat", "dog", "fox"))
    assert attributes.names == ("cat", "dog", "fox")
    assert torch.equal(attributes.values, torch.eye(3)[[1, 0, 2, 1]])
    with pytest.raises(ValueError, match="no sub-folder classes"):
        folder_attributes([-1, -1], None)
    with pytest.raises(ValueError, match=r"classes in \[0, 3\), got \[0, 3\]"):
        folder_attributes([0, 3], ("cat", "dog", "fox"))


def images(root, *names: str) -> ImageFiles:
    return ImageFiles(tuple(root / n for n in names), (-1,) * len(names))


def test_rows_are_matched_by_relative_path_else_by_file_name(tmp_path):
    text = "A B\nsub/x.png 1 -1\nother/x.png -1 1\ny.png 1 1\nz.png -1 -1\n"
    attributes = read_attribute_table(table(tmp_path, text))
    found = images(tmp_path, "z.png", "deep/er/y.png", "other/x.png", "sub/x.png")
    rows = match_attributes(attributes, found, tmp_path)
    assert torch.equal(rows, torch.tensor([[0.0, 0], [1, 1], [0, 1], [1, 0]]))


def test_images_without_a_row_are_named_and_counted(tmp_path):
    attributes = read_attribute_table(table(tmp_path, CELEBA))
    found = images(tmp_path, "000001.jpg", *(f"{i:06d}.jpg" for i in range(10, 17)))
    with pytest.raises(
        ValueError,
        match=r"7 of 8 images have no row .*: 000010.jpg, 000011.jpg, 000012.jpg, 000013.jpg, "
        r"000014.jpg, … \(7 in all\)$",
    ):
        match_attributes(attributes, found, tmp_path)


@pytest.mark.parametrize(
    "rows, names",
    [
        ("a/x.png 1\nb/x.png 0\n", ["c/x.png"]),  # a name on several rows
        ("x.png 1\n", ["a/x.png", "b/x.png"]),  # a row's name on several images
    ],
)
def test_an_ambiguous_file_name_is_refused(tmp_path, rows, names):
    attributes = read_attribute_table(table(tmp_path, "A\n" + rows))
    with pytest.raises(ValueError, match=f"by file name alone.*: {names[0]}"):
        match_attributes(attributes, images(tmp_path, *names), tmp_path)


def test_an_attribute_is_found_by_name_or_index():
    assert attribute_index(NAMES, "male") == 1
    assert attribute_index(NAMES, "Young") == 2
    assert attribute_index(NAMES, 0) == 0
    assert attribute_index(NAMES, "2") == 2
    for wrong in ("Bald", 3, -1, "Smil"):
        with pytest.raises(ValueError, match=f"no attribute {wrong!r}.*Smiling, Male, Young"):
            attribute_index(NAMES, wrong)
