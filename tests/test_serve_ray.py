"""Ray Serve: `python -m asd_deploy serve --ray --replicas 2` on a local Ray instance (CPU), two
concurrent WebSocket clients; each stream stays on one replica and completes, and with one slot
per replica the two land on different replicas (Ray routes the second to the idle one)."""
import threading
import time

import pytest

from serve_util import Server, ws_stream

pytest.importorskip("ray", reason="needs the ray extra (pip install -e '.[ray]'); the dev extra pulls it")


@pytest.mark.slow
def test_two_replicas_two_clients(tmp_path):
    server = Server(tmp_path / "ray.log", "--ray", "--replicas", "2", "--max-streams", "1", "--ray-cpus", "0.5",
                    timeout=300)
    try:
        frames = 1 + 4 * (3 * 6 - 1)  # 6 chunks at the default geometry's 3 latent frames per chunk
        results = [None, None]

        def run(i):
            results[i] = ws_stream(server.ws_url, dict(prompt=f"a red circle moving right {i}", seed=i,
                                                       frames=frames, realtime=True), timeout=180)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        threads[0].start()
        time.sleep(1.0)  # the first holds its replica's only slot when the second arrives
        threads[1].start()
        for t in threads:
            t.join()
        for messages, got, code in results:
            assert messages[0]["type"] == "started" and messages[-1] == {"type": "end", "reason": "complete"}, \
                (messages[:1], messages[-1:], server.log())
            assert code == 1000 and len(got) == messages[0]["chunks"]
        assert results[0][0][0]["replica"] != results[1][0][0]["replica"], "both streams on one replica"
    finally:
        server.stop()
