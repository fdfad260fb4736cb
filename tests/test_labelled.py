"""Labelled data: built-in sets, the restricted unpickler, user files, splits."""

import io
import pickle

import pytest

from stat_core.data.sources import DataError
from stat_core.data.labelled import _RestrictedUnpickler, load_labelled, movie_reviews, newsgroups


def test_newsgroups_sample_loads_without_label_leaks():
    data = newsgroups()
    assert len(data) == 200 and sorted(set(data.labels)) == [0, 1]
    assert data.label_names == ["alt.atheism", "sci.space"]
    assert not any("Newsgroups:" in t.split("\n\n")[0] for t in data.texts)


def test_restricted_unpickler_refuses_anything_else():
    payload = pickle.dumps(print, protocol=0)  # a global that is not on the allow-list
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _RestrictedUnpickler(io.BytesIO(payload)).load()


def test_movie_reviews_and_split_are_disjoint_and_stratified():
    data = movie_reviews()
    assert len(data) == 200 and sum(data.labels) == 100
    train, held = data.split(seed=0)
    assert len(train) == len(held) == 100
    assert sum(train.labels) == sum(held.labels) == 50
    assert not set(train.texts) & set(held.texts)
    again, _ = data.split(seed=0)
    assert again.texts == train.texts


def test_user_csv_with_text_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("title,body,label\na,good film,pos\nb,bad film,neg\nc,great,pos\n")
    data = load_labelled(str(path), text_columns=("title", "body"), label_column="label")
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 0, 1]
    assert "good film" in data.texts[0] and data.texts[0].startswith("a")
    with pytest.raises(DataError, match="lacks column"):
        load_labelled(str(path), label_column="stars")
    with pytest.raises(DataError, match="neither a built-in set"):
        load_labelled(str(tmp_path / "missing.csv"))
