import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import dense_group_mask, near_equal_sizes
from vitblocks.attention import TokenGroups


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), st.integers(0, 3))
def test_sizes_are_near_equal_and_cover_every_token(n_g, prefix):
    n, g = n_g
    groups = TokenGroups(n, g, prefix)
    assert list(groups.sizes) == near_equal_sizes(n, g)
    assert sum(groups.sizes) == n
    assert max(groups.sizes) - min(groups.sizes) <= 1
    assert len(groups.runs) <= 2
    assert groups.runs[-1].stop == n
    assert groups.equal == (n % g == 0)


@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))), st.integers(0, 2))
def test_materialize_matches_independent_mask(n_g, prefix):
    n, g = n_g
    assert TokenGroups(n, g, prefix).materialize().equal(dense_group_mask(n, g, prefix))


@pytest.mark.parametrize("n, g", [(4, 5), (4, 0), (0, 1)])
def test_out_of_range_counts_raise(n, g):
    with pytest.raises(ValueError, match="groups|num_tokens"):
        TokenGroups(n, g)


def test_groups_exceeding_tokens_names_the_argument():
    with pytest.raises(ValueError, match=r"groups=9 .*8 patch tokens"):
        TokenGroups(8, 9)
