from semblend_core import CacheNamespace


def test_equal_fields_equal_keys_and_any_field_changes_key():
    a = CacheNamespace(model="m", kv_dtype="bf16", block_size=16)
    b = CacheNamespace(model="m", kv_dtype="bf16", block_size=16)
    assert a == b and a.key == b.key
    for change in ({"kv_dtype": "fp8"}, {"lora": "adapter1"}, {"cache_salt": "s"}, {"tenant": "t"},
                   {"tensor_parallel": 2}, {"block_size": 32}, {"rope": "x"}, {"revision": "r"}):
        c = CacheNamespace(**{**a.describe(), **change})
        assert c.key != a.key, change


def test_rope_key_is_canonical():
    k1 = CacheNamespace.rope_key({"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    k2 = CacheNamespace.rope_key({"rope_scaling": {"factor": 4, "type": "yarn"}, "rope_theta": 1000000})
    assert k1 == k2 and k1 != CacheNamespace.rope_key({"rope_theta": 1e4})
