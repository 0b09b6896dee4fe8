"""The generation protocol: a request the declaration does not offer is refused by name before
the method runs, and labels/prompts cycle over samples the same however they are batched."""

import pytest
import torch

from diffusion_apps.methods.protocol import (
    Generates,
    Generation,
    SampleRequest,
    cycle,
    generation_of,
)

LABELLED = Generation(("ddim", "ddpm"), "ddim", 10, inputs=("labels",), num_classes=3)


class Recorder(Generates):
    """Returns what it was asked, to show what reaches ``generate``."""

    generation = LABELLED

    def generate(self, num_samples, request):
        self.asked = (num_samples, request)
        return torch.zeros(num_samples, 1, 2, 2)


@pytest.mark.parametrize(
    "request_, message",
    [
        (dict(sampler="dpmpp_2m"), "samples with 'ddim', 'ddpm', not 'dpmpp_2m'"),
        (dict(prompts=["a seven"]), "takes no prompts .*caption-conditioned"),
        (dict(x_T=torch.zeros(1)), "takes no x_T"),
        (dict(scale=2.0), "takes no scale"),
        (dict(labels=[0, 3]), r"classes in \[0, 3\), got \[0, 3\]"),
        (dict(labels=[]), r"non-empty"),
        (dict(steps=0), "steps must be >= 1"),
    ],
)
def test_a_request_the_declaration_does_not_offer_is_refused_by_name(request_, message):
    model = Recorder()
    with pytest.raises(ValueError, match=message):
        model.sample(2, **request_)
    assert not hasattr(model, "asked")  # refused before the method ran


def test_options_a_method_does_not_take_are_refused():
    own_steps = Generation(("consistency",), "consistency", 1, options=())
    for option in ("eta", "spacing"):
        with pytest.raises(ValueError, match=f"takes no {option}"):
            own_steps.check(SampleRequest(**{option: 0.0 if option == "eta" else "quad"}))


def test_an_unknown_keyword_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="takes no lables"):
        Recorder().sample(2, lables=[1])


def test_a_checked_request_reaches_the_method_whole():
    model, gen = Recorder(), torch.Generator()
    model.sample(4, sampler="ddpm", steps=3, labels=[2, 1], generator=gen)
    n, request = model.asked
    assert n == 4 and request == SampleRequest("ddpm", 3, generator=gen, labels=[2, 1])


def test_inputs_cycle_over_samples_whatever_the_batches():
    whole = LABELLED.inputs_for(0, 7, labels=[2, 0])["labels"]
    batched = [x for start, n in [(0, 3), (3, 1), (4, 3)] for x in
               LABELLED.inputs_for(start, n, labels=[2, 0])["labels"]]  # fmt: skip
    assert whole == batched == [2, 0, 2, 0, 2, 0, 2]
    assert LABELLED.inputs_for(2, 4) == {"labels": [2, 0, 1, 2]}  # default: classes in turn
    assert LABELLED.inputs_for(1, 2, prompts=["a", "b", "c"]) == {"prompts": ["b", "c"]}
    assert Generation(("ddim",), "ddim", 1).inputs_for(0, 5) == {}
    assert LABELLED.inputs_for(1, 3, labels=torch.tensor([2, 0])) == {"labels": [0, 2, 0]}


def test_cycle_goes_round_from_any_start():
    assert cycle(["a", "b", "c"], 5, 2) == ["c", "a", "b", "c", "a"]
    with pytest.raises(ValueError, match="empty"):
        cycle([], 2)


def test_a_module_without_a_declaration_generates_nothing():
    assert generation_of(torch.nn.Linear(1, 1)) is None
    with pytest.raises(ValueError, match="does not generate from nothing"):
        type("Plain", (Generates,), {})().sample(1)
