"""Create or correct the local stack's Prefect work pools (run by stack.py in its own Python with
PREFECT_API_URL set): ``python stack_pools.py '{"cpu": null, "gpu": 1}'`` (pool -> concurrency limit).

Each pool is of type ``process`` with the process worker's default base job template; an existing
pool keeps its template and only gets its concurrency limit set.
"""

from __future__ import annotations

import asyncio
import json
import sys


async def ensure(pools: dict[str, int | None]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    async with get_client() as client:
        for name, limit in pools.items():
            try:
                pool = await client.read_work_pool(name)
            except ObjectNotFound:
                await client.create_work_pool(
                    WorkPoolCreate(name=name, type="process", base_job_template=template, concurrency_limit=limit)
                )
                print(f"created work pool {name} (process, concurrency limit {limit})")
                continue
            if pool.type != "process":
                raise SystemExit(f"work pool {name} exists with type {pool.type!r}, expected 'process'")
            if pool.concurrency_limit != limit:
                await client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
            print(f"work pool {name} ready (process, concurrency limit {limit})")


if __name__ == "__main__":
    asyncio.run(ensure(json.loads(sys.argv[1])))
