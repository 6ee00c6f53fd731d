"""ClusterSpec validation: every bad field is a ValueError naming the field and value."""

import numpy as np
import pytest

import clusterjax as cj


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"num_clusters": 0}, "num_clusters must be >= 1"),
        ({"num_clusters": -3}, "num_clusters must be >= 1"),
        ({"num_clusters": 1, "preserve_sparsity": True}, ">= 2 with preserve_sparsity"),
        ({"num_clusters": 4.0}, "must be an int"),
        ({"num_clusters": "16"}, "must be an int"),
        ({"num_clusters": True}, "must be an int"),
        ({"num_clusters": 4, "init": "kmeans+"}, "'linear', 'random', 'density', 'kmeans++'"),
        ({"num_clusters": 4, "granularity": "row"}, "'tensor', 'channel', 'group'"),
        ({"num_clusters": 4, "gradient_aggregation": "avg"}, "'mean', 'sum'"),
        ({"num_clusters": 4, "granularity": "group"}, "group_size"),
        ({"num_clusters": 4, "granularity": "group", "group_size": 0}, "group_size"),
        ({"num_clusters": 4, "group_size": 8}, "only used with granularity='group'"),
        ({"num_clusters": 4, "channel_axis": 1.5}, "channel_axis must be an int"),
        ({"num_clusters": 4, "update_indices": "yes"}, "update_indices must be a bool"),
    ],
)
def test_bad_fields_raise(kwargs, fragment):
    with pytest.raises(ValueError, match="ClusterSpec") as err:
        cj.ClusterSpec(**kwargs)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "k, bits, dtype",
    [
        (1, 1, np.uint8),
        (2, 1, np.uint8),
        (3, 2, np.uint8),
        (16, 4, np.uint8),
        (17, 5, np.uint8),
        (256, 8, np.uint8),
        (257, 9, np.uint16),
        (65536, 16, np.uint16),
        (65537, 17, np.uint32),
    ],
)
def test_bits_and_index_dtype(k, bits, dtype):
    spec = cj.ClusterSpec(num_clusters=k)
    assert spec.bits == bits == max(1, int(np.ceil(np.log2(k))))
    assert spec.index_dtype == np.dtype(dtype)
    assert np.iinfo(spec.index_dtype).max >= k - 1


def test_spec_is_hashable_and_compared_by_value():
    spec = cj.ClusterSpec(num_clusters=np.int64(8))
    assert isinstance(spec.num_clusters, int)
    assert hash(spec) == hash(cj.ClusterSpec(num_clusters=8))
    assert spec == cj.ClusterSpec(num_clusters=8) != cj.ClusterSpec(num_clusters=4)
