"""A step handler service for Orderly (ORDERLY_STEPS=nats): a toy shop.

Each of Orderly's four steps is one endpoint of the NATS service `shop-steps` (`nats micro ls`
shows it), and so is each rollback:

    step             run                 rollback
    Scheduling       reserve stock       release
    Pre-Processing   charge              refund
    Processing       pack                unpack
    Post-Processing  ship                recall

The shop keeps its own records per order, in memory, and answers them on `shop.records` (the body
names an order id, or is empty for every order).

Fencing: the shop remembers the highest `Orderly-Fence` it has seen for each order and refuses a
call with a lower one (`409 stale fence`), when the call arrives and again just before its effect,
so an owner that lost the order cannot change anything any more. Idempotence: each effect is made
at most once per (order, attempt, step); a call that finds it made already (the step was run again
after a takeover: a higher `Orderly-Run`) answers what was done, with `"again": true`.

Rollback during (or before) a run: a rollback of (order, attempt, step) can arrive while a run of
that step still works (the node stopped waiting for it: its timeout passed, or the node died and
another rolled the order back), or before a late run starts. The rollback leaves a tombstone
(`rolled_back` in the records), and a run that finds one makes no effect and answers an error (`410`):
at its start, and when it has done its work, just before its effect (it is then listed in `dropped`).
The checks and the effect of a run, and the tombstone and the undo of a rollback, are each one step
with no await in between, so no call of the same order comes between them: for each (order, step),
either the run's effect is made first and the rollback undoes it, or the tombstone is first and the
effect is never made.

Settings (environment): NATS_URL (default nats://127.0.0.1:4222); SHOP_DELAY, seconds each call
takes (default 0); SHOP_SLOW_AT, a step: then only its run takes SHOP_DELAY; SHOP_FAIL_AT, a step
whose run always fails (for example `processing`). A payload
with `"card": "declined"` fails at charging.

Run: `.tools/steps-venv/bin/python examples/shop_steps.py` (make the venv with
scripts/install-steps-venv).
"""

import asyncio
import json
import os
import signal

import nats
from nats.micro import add_service
from nats.micro.service import EndpointConfig, GroupConfig

STEPS = {
    "scheduling": ("Scheduling", "reserve", "release"),
    "pre-processing": ("Pre-Processing", "charge", "refund"),
    "processing": ("Processing", "pack", "unpack"),
    "post-processing": ("Post-Processing", "ship", "recall"),
}


class StaleFence(Exception):
    pass


class RolledBack(Exception):
    pass


class Shop:
    def __init__(self, delay, slow_at, fail_at):
        self.delay = delay
        self.slow_at = slow_at
        self.fail_at = fail_at
        self.orders = {}

    def record(self, order_id):
        return self.orders.setdefault(order_id, {"fence": 0, "calls": [], "effects": []})

    def check_fence(self, order_id, fence):
        record = self.record(order_id)
        if fence < record["fence"]:
            raise StaleFence(f"stale fence {fence}: this order's highest fence is {record['fence']}")
        record["fence"] = fence

    @staticmethod
    def rolled_back(record, attempt, step):
        return {"attempt": attempt, "step": step} in record.get("rolled_back", [])

    async def call(self, slug, verb, headers, body):
        order_id = headers["Orderly-Order-Id"]
        fence = int(headers["Orderly-Fence"])
        attempt = int(headers["Orderly-Attempt"])
        run = int(headers["Orderly-Run"])
        step, action, undo = STEPS[slug]
        self.check_fence(order_id, fence)
        record = self.record(order_id)
        record["calls"].append({"call": verb, "step": step, "attempt": attempt, "run": run, "fence": fence})
        if verb == "run" and self.rolled_back(record, attempt, step):
            raise RolledBack(f"{step} was rolled back: {action} not made")
        if self.delay and (not self.slow_at or (self.slow_at, "run") == (slug, verb)):
            await asyncio.sleep(self.delay)
        # From here on nothing awaits: the checks and the effect are one step, which no other call of
        # this order (its rollback in particular) can come between. The fence is checked again where
        # it matters: just before the effect.
        self.check_fence(order_id, fence)
        kind = action if verb == "run" else undo
        if verb == "run" and self.rolled_back(record, attempt, step):
            # The rollback came while this run worked: it found nothing to undo, so make nothing.
            record.setdefault("dropped", []).append({"attempt": attempt, "step": step, "action": action, "run": run, "fence": fence})
            raise RolledBack(f"{step} was rolled back while it ran: {action} not made")
        if verb == "run" and (self.fail_at == slug or (action == "charge" and body.get("payload", {}).get("card") == "declined")):
            raise ValueError(f"{kind} refused" + (" (SHOP_FAIL_AT)" if self.fail_at == slug else ": card declined"))
        if verb == "rollback" and not self.rolled_back(record, attempt, step):
            # Whatever run of this step comes or ends from now on makes no effect.
            record.setdefault("rolled_back", []).append({"attempt": attempt, "step": step})
        for effect in record["effects"]:
            if (effect["attempt"], effect["step"], effect["action"]) == (attempt, step, kind):
                return {**effect, "again": True}
        if verb == "rollback" and not any(
            (e["attempt"], e["step"], e["action"]) == (attempt, step, action) for e in record["effects"]
        ):
            # The step failed, or has not made its effect (yet: the tombstone stops it), or never ran.
            return {"attempt": attempt, "step": step, "action": kind, "nothing_to_undo": True}
        effect = {"attempt": attempt, "step": step, "action": kind, "run": run, "fence": fence}
        record["effects"].append(effect)
        return effect


async def main():
    env = os.environ.get
    shop = Shop(float(env("SHOP_DELAY", "0")), env("SHOP_SLOW_AT", "").lower(), env("SHOP_FAIL_AT", "").lower())
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    service = await add_service(nc, name="shop-steps", version="1.0.0",
                                description="The toy shop's Orderly step handlers")

    def endpoint(slug, verb):
        async def handle(request):
            # Each call runs on its own, so a slow one holds up no other.
            asyncio.create_task(answer(request, slug, verb))
        return handle

    async def answer(request, slug, verb):
        try:
            body = json.loads(request.data or b"{}")
            done = await shop.call(slug, verb, request.headers or {}, body)
            await request.respond(json.dumps(done).encode())
        except StaleFence as e:
            await request.respond_error("409", str(e))
        except RolledBack as e:
            await request.respond_error("410", str(e))
        except (KeyError, ValueError) as e:
            await request.respond_error("422", str(e))

    for slug in STEPS:
        group = service.add_group(GroupConfig(name=f"orders.steps.{slug}"))
        for verb in ("run", "rollback"):
            await group.add_endpoint(EndpointConfig(name=f"{slug}-{verb}", subject=verb,
                                                    handler=endpoint(slug, verb)))

    async def records(request):
        wanted = request.data.decode().strip()
        shown = {wanted: shop.orders.get(wanted)} if wanted else shop.orders
        await request.respond(json.dumps(shown).encode())

    await service.add_endpoint(EndpointConfig(name="records", subject="shop.records", handler=records))
    print("shop-steps ready", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
