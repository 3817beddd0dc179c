"""`protege-relay egress`: arq workers that deliver outbound mail (DESIGN.md "Outbound" 3-4).

Wiring only: Redis, the worker (`prompt_worker.PromptWorker`, an arq `Worker` that starts the
next job as soon as one ends) running `worker.deliver`, the health server and the node
heartbeat. Timing: one attempt may take `egress.jobTimeoutSeconds`; the worker cancels a job a
little after that, and the job's in-progress key lives a little longer still, so a job whose worker
died is picked up again by another worker about `jobTimeoutSeconds + 3 s` after it started
(arq's default would add 10 s more). Shutdown: stop taking jobs, let running ones finish for up
to one whole attempt (`jobTimeoutSeconds` + the publish margin: deploy/ sizes the stop grace
period on this), then cancel the rest, which the worker hands back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from arq.worker import Worker, func

from services.egress.prompt_worker import PromptWorker
from services.egress.results import claim_state_keys
from services.egress.worker import Egress, deliver
from shared import keys
from shared.backlog import refresh_backlog_metrics
from shared.config import RelayConfig
from shared.health import HealthServer
from shared.logs import get_logger, log
from shared.nodeinfo import HEARTBEAT_INTERVAL_S, publish_node_info, remove_node_info
from shared.redis import connect, connect_arq, wait_for_redis
from shared.secrets import SecretFileError
from shared.versions import require_tested

logger = get_logger(__name__)

POLL_DELAY_S = 0.1  # idle only: a finishing job starts the next at once (prompt_worker)
PUBLISH_MARGIN_S = 2  # after the attempt budget: time to record and publish the result
IN_PROGRESS_GRACE_S = 1
CRASH_RERUNS_ALLOWED = 3  # arq tries beyond maxAttempts, so a crashed last try still publishes
RESTART_DELAY_S = 1.0


def build_worker(config: RelayConfig, egress: Egress) -> Worker:
    job_timeout_s = config.egress.jobTimeoutSeconds + PUBLISH_MARGIN_S
    worker = PromptWorker(
        functions=[func(deliver, name="deliver")],
        redis_pool=connect_arq(config),  # Sentinel's primary when configured
        queue_name=keys.EGRESS_QUEUE,
        max_jobs=config.egress.maxJobs,
        poll_delay=POLL_DELAY_S,
        handle_signals=False,
        max_tries=config.egress.maxAttempts + CRASH_RERUNS_ALLOWED,
        job_timeout=job_timeout_s,
        keep_result=0,  # results go to the persona's stream; arq's copy would hold the message
        ctx={"egress": egress},
        job_state=claim_state_keys(),  # a job's prior state comes with its claim
        failover_wait_s=config.redis.failoverWaitMs / 1000,
    )
    worker.in_progress_timeout_s = job_timeout_s + IN_PROGRESS_GRACE_S
    return worker


class EgressService:
    def __init__(self, config: RelayConfig) -> None:
        self._config = config
        self._redis: aioredis.Redis = connect(config)
        self._egress = Egress.from_config(config, self._redis)
        self._worker: Worker | None = None
        self._node_id = config.node_id

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def ready(self) -> bool:
        if self._worker is None or self._worker.main_task is None or self._worker.main_task.done():
            return False
        return bool(await self._redis.ping())

    async def run_worker(self, stopping: asyncio.Event) -> None:
        """Run arq until `stopping`; if its loop dies (e.g. Redis went away) start a new one."""
        while not stopping.is_set():
            worker = self._worker = build_worker(self._config, self._egress)
            run = asyncio.ensure_future(worker.async_run())
            stop_wait = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({run, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if run.done():
                error = run.exception() if not run.cancelled() else None
                log(
                    logger,
                    logging.ERROR,
                    "worker loop ended; restarting",
                    error=type(error).__name__ if error else None,
                )
                await _close_ended(worker)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), RESTART_DELAY_S)
                continue
            await self._drain(worker)
            await worker.close()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run

    async def _drain(self, worker: Worker) -> None:
        worker.allow_pick_jobs = False
        log(
            logger,
            logging.INFO,
            "stopping: draining running jobs",
            running=sum(not task.done() for task in worker.tasks.values()),
        )
        drain_timeout_s = self._config.egress.jobTimeoutSeconds + PUBLISH_MARGIN_S
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        while any(not task.done() for task in worker.tasks.values()):
            if asyncio.get_running_loop().time() > deadline:
                log(logger, logging.WARNING, "drain timeout; handing running jobs back to the queue")
                return
            await asyncio.sleep(POLL_DELAY_S)

    async def heartbeat(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            worker = self._worker
            try:
                await publish_node_info(
                    self._redis,
                    self._node_id,
                    "egress",
                    jobs_running=len(worker.tasks) if worker else 0,
                    jobs_complete=worker.jobs_complete if worker else 0,
                    jobs_retried=worker.jobs_retried if worker else 0,
                )
            except Exception as exc:
                log(logger, logging.WARNING, "node heartbeat failed", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), HEARTBEAT_INTERVAL_S)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._egress.close()
        with contextlib.suppress(Exception):
            await remove_node_info(self._redis, self._node_id)
        await self._redis.aclose()


async def _close_ended(worker: Worker) -> None:
    """Close a worker whose loop ended, whatever its jobs raise. arq's close cancels the running
    jobs and gathers them; a job cancelled while it was recording its end (a shielded finish,
    prompt_worker.py) ends as cancelled, so the gather raises CancelledError, which is no
    `Exception`: awaited directly it would end `run_worker` too, and with it all delivery, for
    good (the failover test's "outbound results missing"). Only a cancellation of this task
    itself is passed on."""
    closing = asyncio.ensure_future(worker.close())
    await asyncio.wait({closing})
    if not closing.cancelled() and closing.exception() is not None:
        log(logger, logging.WARNING, "ended worker closed with an error", error=type(closing.exception()).__name__)


async def serve(config: RelayConfig, stopping: asyncio.Event) -> None:
    require_tested("egress", "arq", "redis")  # prompt_worker.py writes arq's keys; shared/redis_send.py
    try:
        service = EgressService(config)
    except SecretFileError as exc:
        log(logger, logging.ERROR, "cannot start: key file refused", error=str(exc))
        raise SystemExit(f"protege-relay egress: {exc}") from None
    health: HealthServer | None = None
    if config.egress.httpPort:
        health = HealthServer(
            config.host,
            config.egress.httpPort,
            service.ready,
            refresh_metrics=lambda: refresh_backlog_metrics(config, "egress"),
            field="egress.httpPort",
        )
        try:
            await health.start()
        except BaseException:
            await service.close()
            raise
    if not await wait_for_redis(service.redis, config, logger, stopping):
        if health is not None:
            await health.close()
        await service.close()
        return
    tasks = [asyncio.ensure_future(service.run_worker(stopping)), asyncio.ensure_future(service.heartbeat(stopping))]
    log(
        logger,
        logging.INFO,
        "ready",
        node_id=config.node_id,
        http_port=health.port if health else None,
        queue=keys.EGRESS_QUEUE,
        max_jobs=config.egress.maxJobs,
    )
    try:
        await stopping.wait()
    finally:
        stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if health is not None:
            await health.close()
        await service.close()
        log(logger, logging.INFO, "stopped", node_id=config.node_id)
