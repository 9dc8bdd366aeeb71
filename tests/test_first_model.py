"""What a first model built from the blocks hits: refusals that say what to do instead of torch's raw errors."""

import functools

import pytest
import torch

from vitblocks import NonLinearMix, Recursive, TransformerBlock


@pytest.fixture(scope="module")
def block():
    return TransformerBlock(dim=32, num_heads=2, groups=(4, 2))


def test_a_mix_class_that_needs_arguments_is_refused_with_the_factory_to_write_instead(block):
    with pytest.raises(TypeError, match=r"mix=NonLinearMix is called with no arguments once per loop, but .*'dim'.*"
                                        r"mix=lambda: NonLinearMix\(dim\)"):
        Recursive(block, loops=2, mix=NonLinearMix)
    stage = Recursive(block, loops=2, mix=functools.partial(NonLinearMix, 32))  # the advice works
    assert len(stage.mix) == 2 and stage(torch.randn(2, 17, 32)).shape == (2, 17, 32)


def test_a_group_schedule_longer_than_the_loops_is_refused(block):
    with pytest.raises(ValueError, match=r"attn has groups=\(4, 2\), one count per loop for 2 loops, but Recursive "
                                         r"runs 1: give groups=\(4,\) or loops=2"):
        Recursive(block, loops=1)
    assert Recursive(block, loops=3).loops == 3  # shorter than the loops: the last count repeats, as documented
    assert Recursive(block, loops=1, check_groups=False).loops == 1  # a stage-wide schedule, as SReT's stages


def test_a_block_names_the_shape_it_takes(block):
    with pytest.raises(ValueError, match=r"takes tokens of shape \(batch, tokens, 32\), got \(2, 32, 4, 4\): "
                                         r"flatten a feature map first"):
        block(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match=r"built with dim=32 but got tokens of width 48 .*build it with dim=48"):
        block(torch.randn(2, 16, 48))
    with pytest.raises(ValueError, match=r"TransformerBlock was built with dim=32"):
        Recursive(block, loops=2)(torch.randn(2, 16, 48))  # also inside a wrapper


def test_the_end_of_run_summary_lists_best_and_last(tmp_path):
    from vitblocks.train.outputs.run_folder import RunFolder

    folder = RunFolder(tmp_path)
    (tmp_path / "last.pth").write_bytes(b"")
    assert folder.summary_files([])["checkpoints"] == f"{tmp_path / 'last.pth'} (last epoch)"
    (tmp_path / "best.pth").write_bytes(b"")
    assert folder.summary_files([])["checkpoints"] == f"{tmp_path / 'best.pth'} (best top-1), " \
                                                      f"{tmp_path / 'last.pth'} (last epoch)"


def test_tracing_records_no_input_check_as_a_warning():
    """torch.jit.trace warns on every Python bool taken from a traced shape; the input checks skip under a trace.

    What still warns is the group layout computed from the token count (a constant of the traced size by design)
    and the position map's fast path."""
    import warnings

    import timm

    model = timm.create_model("sret_t", img_size=64).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.jit.trace(model, torch.randn(1, 3, 64, 64))
    sources = {w.filename.split("/vitblocks/")[-1] for w in caught
               if issubclass(w.category, torch.jit.TracerWarning) and "/vitblocks/" in w.filename}
    assert sources <= {"attention/groups.py", "layers/position.py"}, sources
