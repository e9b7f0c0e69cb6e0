"""End to end with the DSA engine on software work queues: ``dsamig send
--engine dsa --dsa-emulate 2`` against ``dsamig receive``, with and without
injected faults."""

from __future__ import annotations

import os

import pytest

from dsamig.native import native
from tests.conftest import read_bytes
from tests.integration.helpers import Receiver, dsamig, last_json, transfer_in_process

pytestmark = pytest.mark.skipif(
    native is None or not hasattr(native, "DsaEngineCore"), reason="the DSA engine is native only"
)

PAGE = 4096
ENGINE_KEYS = ("backend", "submission", "wqs", "descriptors", "batches", "submit-retries",
               "retry-exhausted", "page-faults", "cpu-fallback-pages", "timeouts", "errors",
               "quarantines", "readmissions", "probe-failures", "probe-timeouts", "wqs-out",
               "held", "completion-thread-cpu-s")


def send_and_receive(tmp_path, image: str, *send_args: str) -> tuple[dict, dict, str]:
    output = str(tmp_path / "dest.img")
    receiver = Receiver.start(output, "--once", "--json")
    try:
        sent = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--channels", "3",
                      "--json", *send_args)
        code, out, err = receiver.finish()
    finally:
        receiver.kill()
    assert sent.returncode == 0, sent.stderr
    assert code == 0, err
    return last_json(sent.stdout), last_json(out), output


@pytest.mark.parametrize(
    "faults",
    [None, "page-fault=0.05,batch-fail=0.05,hw-error=0.002,hang=0.01,wq-full=0.2,seed=7"],
    ids=["clean", "faults"],
)
def test_send_with_emulated_dsa(tmp_path, image_factory, faults: str | None) -> None:
    image, zero, normal = image_factory(24 * 1024 * 1024 + 3 * PAGE + 123, seed=21)
    extra = ["--engine", "dsa", "--dsa-emulate", "2", "--dsa-timeout", "0.3"]
    if faults:
        extra += ["--dsa-emulate-faults", faults]
    sent, received, output = send_and_receive(tmp_path, image, *extra)
    assert read_bytes(output) == read_bytes(image)
    for stats in (sent, received):
        assert stats["status"] == "completed"
        assert (stats["duplicate"], stats["normal"]) == (zero, normal)
    engine = sent["engine"]
    for key in ENGINE_KEYS:
        assert key in engine, key
    assert engine["backend"] == "dsa" and engine["submission"] == "emulated"
    assert len(engine["wqs"]) == 2 and engine["descriptors"] > 0
    assert "dsamig-dsa-cmpl" in sent["thread-cpu-s"]
    devices = [wq["device"] for wq in engine["wqs"]]
    if faults is None:
        assert engine["cpu-fallback-pages"] == engine["page-faults"] == engine["timeouts"] == 0
        assert all(wq["healthy"] for wq in engine["wqs"])
    else:
        injected = sum(d["faults-injected"] for d in devices)
        assert injected > 0 and engine["page-faults"] >= injected
        assert engine["submit-retries"] == sum(d["refused"] for d in devices) > 0
        # A hang is a unit's timeout or a probe's; at most one probe per WQ
        # may still be waiting when the job's figures are taken.
        hangs = sum(d["hangs-injected"] for d in devices)
        timed_out = engine["timeouts"] + engine["probe-timeouts"]
        assert timed_out <= hangs <= timed_out + len(devices)
        assert engine["cpu-fallback-pages"] > 0


def test_engine_dsa_without_work_queues_is_an_error(tmp_path, image_factory) -> None:
    if os.path.exists("/sys/bus/dsa/devices"):
        pytest.skip("this machine has DSA devices")
    image, _, _ = image_factory(PAGE, seed=1)
    receiver = Receiver.start(str(tmp_path / "dest.img"), "--once")
    try:
        sent = dsamig("send", image, "--to", f"127.0.0.1:{receiver.port}", "--engine", "dsa")
    finally:
        receiver.kill()
    assert sent.returncode == 2
    assert "engine dsa" in sent.stderr and "does not exist" in sent.stderr
    assert "Traceback" not in sent.stderr


def test_bad_fault_spec_is_a_usage_error(tmp_path, image_factory) -> None:
    image, _, _ = image_factory(PAGE, seed=1)
    sent = dsamig("send", image, "--to", "127.0.0.1:9", "--engine", "dsa", "--dsa-emulate", "1",
                  "--dsa-emulate-faults", "page-fault=0.1,hangs=1")
    assert sent.returncode == 2 and "hangs" in sent.stderr


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
async def test_in_process_with_dedicated_and_shared_queues(tmp_path, image_factory,
                                                            mode: str) -> None:
    from dsamig.dsa_config import DsaConfig

    image, zero, normal = image_factory(9 * 1024 * 1024 + 7, seed=5)
    output = str(tmp_path / "out.img")
    config = DsaConfig(emulate=2, emulate_mode=mode, emulate_size=16)
    sent, received = await transfer_in_process(image, output, channels=4, engine="dsa",
                                               dsa=config)
    assert read_bytes(output) == read_bytes(image)
    assert (received.counters.zero_pages, received.counters.normal_pages) == (zero, normal)
    assert sent.engine["wqs"][0]["method"] == ("movdir64b" if mode == "dedicated" else "enqcmd")
    assert sent.engine["timeouts"] == 0


async def test_sender_daemon_shares_one_dsa_engine_among_its_jobs(image_factory) -> None:
    """Two concurrent jobs of one sender daemon on one dedicated software WQ:
    the daemon opens it once and both jobs use it, where a second open of a
    dedicated WQ would fail with EBUSY."""
    import asyncio

    from structlog.testing import capture_logs

    from dsamig.control import ControlClient
    from dsamig.daemon.receiver import ReceiverDaemon
    from dsamig.daemon.sdnotify import Notifier
    from dsamig.daemon.sender import SenderDaemon
    from dsamig.jobs.config import ReceiverConfig, SenderConfig
    from dsamig.jobs.schema import Document
    from tests.integration.daemon_helpers import job_document, short_dir

    images = [image_factory(4 * 1024 * 1024 + PAGE * i, seed=60 + i) for i in range(2)]
    engine = {"kind": "dsa", "dsa": {"emulate": {"count": 1, "mode": "dedicated", "size": 16}}}
    with short_dir() as directory:
        storage = os.path.join(directory, "images")
        os.mkdir(storage)
        receiver = ReceiverDaemon(ReceiverConfig.from_document(Document.from_object(
            {"listen": "127.0.0.1:0", "storage_dir": storage,
             "control_socket": os.path.join(directory, "r.sock")}, "test")),
            notifier=Notifier(None), install_signals=False)
        sender = SenderDaemon(SenderConfig.from_document(Document.from_object(
            {"control_socket": os.path.join(directory, "s.sock"),
             "source_dirs": [os.path.dirname(images[0][0])]}, "test")),
            notifier=Notifier(None), install_signals=False)
        with capture_logs() as logs:
            served = [asyncio.ensure_future(d.serve()) for d in (receiver, sender)]
            try:
                for _ in range(1000):  # bounded: 10 s
                    if receiver.listen_address and os.path.exists(sender.config.control_socket):
                        break
                    await asyncio.sleep(0.01)
                assert receiver.listen_address is not None
                port = receiver.listen_address[1]
                async with await ControlClient.connect(sender.config.control_socket) as client:
                    await client.execute("subscribe")
                    # Paced, so that the first job still runs when the second starts.
                    jobs = [await client.execute("job-start", job_document(
                        f"shared-{i}", image, port, channels=2, engine=engine,
                        max_bandwidth="4MiB")) for i, (image, _, _) in enumerate(images)]
                    done: set[str] = set()
                    while len(done) < 2:
                        event = await client.next_event(60)
                        data = event["data"]
                        if data.get("status") in ("completed", "failed", "cancelled"):
                            assert data["status"] == "completed", data
                            done.add(data["id"])
                assert sender.engines.open_engines == 1
            finally:
                for daemon in (receiver, sender):
                    daemon.request_stop()
                assert await asyncio.wait_for(asyncio.gather(*served), 15) == [0, 0]
        assert sender.engines.open_engines == 0  # closed with the daemon
        for i, (image, _, _) in enumerate(images):
            assert read_bytes(os.path.join(storage, f"shared-{i}")) == read_bytes(image)
    reasons = {e["job"]: e["reason"] for e in logs if e["event"] == "engine selected"}
    first, second = (reasons[job["id"]] for job in jobs)
    assert "software work queue" in first and "shared with" not in first
    assert second.endswith("(shared with 1 running job(s))")
