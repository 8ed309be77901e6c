"""The stand-ins' shared prep cache: reused while hot, bounded for a long-running server."""

from omni_trt.models.standin import PrepCache


def test_prep_cache_reuses_and_evicts_the_least_recently_used():
    made = []
    cache = PrepCache(size=2)

    def make(key):
        return lambda: made.append(key) or f"tables-{key}"

    assert cache.get("a", make("a")) == "tables-a"
    assert cache.get("b", make("b")) == "tables-b"
    assert cache.get("a", make("a")) == "tables-a"  # hit: nothing made
    cache.get("c", make("c"))  # evicts b, the least recently used
    assert len(cache) == 2 and made == ["a", "b", "c"]
    cache.get("a", make("a"))
    cache.get("b", make("b"))
    assert made == ["a", "b", "c", "b"]
