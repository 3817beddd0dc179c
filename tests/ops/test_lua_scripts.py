"""Every script in shared/lua.py compiles in a real redis-server (SCRIPT LOAD), under the SHA
its callers send with EVALSHA, and the runner recovers from NOSCRIPT after a SCRIPT FLUSH."""

from __future__ import annotations

import redis

from shared import keys, lua


def test_every_script_loads_under_its_sha(redis_client: redis.Redis) -> None:
    scripts = lua.all_scripts()
    loaded = {name: redis_client.script_load(script.source) for name, script in scripts.items()}
    assert loaded == {name: script.sha for name, script in scripts.items()}
    assert all(redis_client.script_exists(*(script.sha for script in scripts.values())))
    print(f"{len(scripts)} scripts loaded: {', '.join(sorted(scripts))}")


def test_a_bound_script_reloads_itself_after_a_flush(redis_client: redis.Redis) -> None:
    redis_client.script_flush()
    assert redis_client.script_exists(lua.RENEW_OWNER.sha) == [False]
    # the owner keys name another socket: RENEW_OWNER refuses, whatever the script cache held
    redis_client.set(keys.socket("pk"), "other")
    renewed = lua.RENEW_OWNER.on(redis_client)(keys=[keys.owner("pk"), keys.socket("pk")], args=["n", "s", 30])
    assert renewed == 0
    assert redis_client.script_exists(lua.RENEW_OWNER.sha) == [True]
