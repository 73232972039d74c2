"""`import sdedit` is light: torch comes with the first name that needs it, diffusers with
`load`; seeds and folder descriptions need neither (a pipeline's driver and read tasks use only
those). Each check runs in a fresh interpreter, as a Ray worker would."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, check=True)
    return done.stdout.strip()


def test_seeds_and_folder_descriptions_import_neither_torch_nor_diffusers():
    out = fresh("""
        import sys
        import sdedit
        from sdedit.loading import describe
        info = describe("default")
        print(sdedit.stable_seed(0, None, "a", 0.5, 0), sdedit.stable_seed("guides", 3, "row7"),
              info.resolution, info.digest[:7], "torch" in sys.modules,
              "diffusers" in sys.modules)
    """)
    # seeds are a contract: OUTPUTs resume only if every release derives the same ones
    assert out == "736016875564474625 3201651139099133492 32 sha256: False False"


def test_names_load_on_first_use_and_edit_stays_the_function():
    out = fresh("""
        import sys
        import sdedit
        before = "torch" in sys.modules
        prior = sdedit.load("builtin:tiny")
        import torch
        guide = torch.zeros(2, 3, 64, 64)
        first = prior.edit(guide, t0=0.3, steps=2, generator=sdedit.generators([1, 2]))
        again = sdedit.edit(prior.model, prior.schedule, guide, t0=0.3, steps=2,
                            generator=sdedit.generators([1, 2]))
        print(before, "diffusers" in sys.modules, sdedit.edit.__module__,
              torch.equal(first, again), set(sdedit.__all__) <= set(dir(sdedit)))
    """)
    assert out == "False True sdedit.editing True True"


def test_unknown_names_are_attribute_errors():
    import sdedit

    with pytest.raises(AttributeError, match="no attribute 'sample'"):
        sdedit.sample  # noqa: B018
