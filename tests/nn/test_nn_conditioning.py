"""The byte-level caption tokenizer: exact ids, the empty caption as ∅, truncation at a whole
character, and the tokenizer's options refused when they do not fit together."""

import pytest
import torch

from diffusion_apps.nn import CaptionEncoder


def byte_encoder(max_len=8):
    return CaptionEncoder(tokenizer="bytes", dim=16, depth=1, head_dim=8, max_len=max_len)


def test_byte_ids_are_the_utf8_bytes_plus_one_and_the_empty_caption_is_null():
    enc = byte_encoder()
    ids = enc.tokenize([" a  Cé\n", ""])  # white space collapsed, case kept; é is 0xC3 0xA9
    assert ids.tolist() == [[98, 33, 68, 196, 170, 0, 0, 0], [0] * 8]
    assert torch.equal(ids[1:], enc.null(1))
    assert enc.embed.num_embeddings == 257 and enc(ids).shape == (2, 8, 16)
    kept = bytes(i - 1 for i in ids[0].tolist() if i).decode("utf-8")
    assert kept == "a Cé"  # the ids round-trip to the collapsed caption


def test_a_long_caption_is_cut_after_its_last_whole_character():
    enc = byte_encoder(max_len=4)
    # "a Cé" is 5 bytes; the 4th and 5th are é's: cutting at 4 would split it, so 3 are kept
    assert enc.tokenize(["a Cé", "abcdef"]).tolist() == [[98, 33, 68, 0], [98, 99, 100, 101]]


def test_captions_that_differ_get_different_contexts():
    torch.manual_seed(0)
    enc = byte_encoder(max_len=12)
    red, blue, null = enc(enc.tokenize(["a red cup", "a blue cup", ""]))
    assert not torch.allclose(red, blue) and not torch.allclose(red, null)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"tokenizer": "words"}, "needs a vocabulary"),
        ({"tokenizer": "bytes", "vocabulary": ["a"]}, "takes none"),
        ({"tokenizer": "chars", "vocabulary": ["a"]}, "'words' or 'bytes'"),
        ({"tokenizer": "bytes", "max_len": 0}, "max_len must be >= 1"),
    ],
)
def test_options_that_do_not_fit_together_are_refused(kwargs, named):
    with pytest.raises(ValueError, match=named):
        CaptionEncoder(dim=16, head_dim=8, **kwargs)
