"""The job queue survives crashes: a real ``kandinsky5 serve`` is killed (SIGKILL) twice while a job runs and
stopped once (SIGTERM), and started again each time on the same data folder. Every job completes exactly once, in
the order it was submitted, and its MP4 plays with the frames asked for; nothing is lost or run twice.

Runs are counted from ``jobs.log`` (the server's own record of each job start and end). The recovery rules
themselves (a written video completes its job; a job interrupted ``MAX_ATTEMPTS`` times fails) are also checked on
the store directly.
"""

from __future__ import annotations

from collections import Counter

from serve_helpers import Server, job_log, tiny_checkpoint, video_frames, wait_for

from kandinsky5.serve.store import MAX_ATTEMPTS, JobStore, new_job_id

JOBS = 20
# half a second per job on a quiet CPU: short enough for 20 of them, long enough to be caught running
JOB = {"size": "96x64", "num_frames": 9, "num_inference_steps": 30}
# the interruptions, each once this many jobs have completed (so that completed jobs outlive each restart)
INTERRUPTIONS = (("kill", 3), ("kill", 8), ("stop", 13))


def test_killed_and_stopped_servers_lose_nothing_and_run_nothing_twice(tmp_path):
    data = tmp_path / "data"
    server = Server(tiny_checkpoint(tmp_path / "tiny"), data)
    server.start()
    try:
        with server.client() as client:
            sent = [{"prompt": f"clip number {n}", "seed": 1000 + n, **JOB} for n in range(JOBS)]
            ids = [client.post("/v1/videos", json=fields).json()["id"] for fields in sent]
        caught = []
        for how, completed in INTERRUPTIONS:
            with server.client() as client:
                running = wait_for(lambda c=client, n=completed: running_job(c, n), 180, what="a job to run")
            code = server.kill() if how == "kill" else server.stop()
            assert code == (-9 if how == "kill" else 0), server.log_tail()
            caught.append(running)
            server.start()
        with server.client() as client:
            jobs = wait_for(lambda: all_completed(client, ids), timeout=180, what="every job to complete")
    finally:
        server.stop()

    # the jobs: all there once, completed, with what was sent, their MP4s complete
    assert [job["id"] for job in jobs] == ids
    for job, fields in zip(jobs, sent, strict=True):
        assert job["status"] == "completed", job
        assert (job["prompt"], job["seed"], job["num_frames"]) == (fields["prompt"], fields["seed"], 9)
        frames = video_frames(data / "videos" / f"{job['id']}.mp4")
        assert len(frames) == 9 and frames[0].shape == (64, 96, 3)
    assert sorted(p.name for p in (data / "videos").iterdir()) == sorted(f"{i}.mp4" for i in ids)  # no partial

    # the log: each job completed once, in submission order, and never started again after that
    log = job_log(data)
    assert [job_id for event, job_id in log if event == "completed"] == ids
    for job_id in ids:
        assert ("start", job_id) not in log[log.index(("completed", job_id)) + 1 :]
    # what each interruption caught running was recovered at the next start (killed) or queued again (stopped);
    # a job may finish in the instant between being seen running and the signal, so only nearly all are
    recovered = [(event, job_id) for event, job_id in log if event.startswith("recovered-") or event == "requeued"]
    assert len(recovered) >= len(INTERRUPTIONS) - 1 and all(job_id in caught for _, job_id in recovered), recovered
    # a job ran once more per time it was queued again (not when its video was written before the kill)
    starts = Counter(job_id for event, job_id in log if event == "start")
    again = Counter(job_id for event, job_id in recovered if event != "recovered-completed")
    assert {job_id: starts[job_id] for job_id in ids} == {job_id: 1 + again[job_id] for job_id in ids}


def running_job(client, completed: int) -> str | None:
    """The id of the running job once at least ``completed`` jobs have completed."""
    data = client.get("/v1/videos", params={"limit": 100}).json()["data"]
    if sum(job["status"] == "completed" for job in data) < completed:
        return None
    running = [job["id"] for job in data if job["status"] == "in_progress"]
    return running[0] if running else None


def all_completed(client, ids: list[str]) -> list[dict] | None:
    data = client.get("/v1/videos", params={"limit": 100, "order": "asc"}).json()["data"]
    return data if len(data) == len(ids) and all(job["status"] == "completed" for job in data) else None


# ---------------------------------------------------------------------------------------------- recovery rules


def new_job(store: JobStore) -> str:
    job_id = new_job_id()
    store.insert(
        id=job_id,
        model="tiny",
        prompt="a fox",
        negative_prompt=None,
        width=96,
        height=64,
        num_frames=5,
        fps=24,
        num_inference_steps=2,
        guidance_scale=1.0,
        seed=2**64 - 1,  # the largest torch seed: beyond SQLite's integers, kept exactly
        mode="t2v",
        cache="none",
        expand_prompt=False,
        input_path=None,
    )
    return job_id


def test_recovery_completes_written_videos_and_gives_up_after_max_attempts(tmp_path):
    store = JobStore(tmp_path)
    written, interrupted = new_job(store), new_job(store)
    assert store.claim_next().id == written
    # the video was renamed into place, then the server died before marking the job completed
    store.video_path(written).write_bytes(b"an mp4")
    (store.video_path(written).parent / f".{written}.mp4.partial-0123abcd.mp4").write_bytes(b"half")
    recovery = store.recover()
    assert recovery.completed == [written] and recovery.requeued == []
    job = store.get(written)
    assert job.status == "completed" and job.progress == 100 and job.output_path == f"videos/{written}.mp4"
    assert job.seed == 2**64 - 1
    assert [p.name for p in store.video_path(written).parent.iterdir()] == [f"{written}.mp4"]
    assert store.claim_next().id == interrupted  # the completed job is not run again

    for attempt in range(1, MAX_ATTEMPTS + 1):
        recovery = store.recover()
        job = store.get(interrupted)
        assert job.attempts == attempt
        if attempt < MAX_ATTEMPTS:
            assert recovery.requeued == [interrupted] and job.status == "queued"
            assert store.claim_next().id == interrupted
        else:
            assert recovery.failed == [interrupted] and job.status == "failed"
            assert f"{MAX_ATTEMPTS} times" in job.error
    assert store.claim_next() is None
