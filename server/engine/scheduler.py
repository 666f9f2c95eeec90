"""Continuous-batching bookkeeping: who waits, who runs, which slot each row owns, and how
many tokens each row feeds in the next step under a token budget.

Pure Python on purpose (no torch): every decision here is unit-tested exactly.
Running rows stay compact in slots `0..n-1`; a retired row's slot is filled by the last row.

A row's work is a sequence of tokens to feed (its prompt; after a preemption, its prompt and
what it generated so far). Like vLLM v1, prompt and generated tokens are alike: each step a
row feeds its next tokens; while it has more than one left it is *prefilling* (possibly in
chunks over several steps), then it *decodes* one token a step. Running decode rows are
scheduled first, prefill chunks fill the rest of the budget. With `max_stall` (stall-free
batching, Sarathi-Serve), while rows decode one row's prefill chunk is at most
`max(min_prefill_tokens, (max_stall - 1) * decode rows)` tokens: a step's cost grows about
linearly with its tokens, so a long prompt stretches the decode rows' steps by about `max_stall`
at most, spread over more steps; the floor keeps prompts moving when few rows decode. The cap is
per row, not per step: short prompts of many new rows still start together (their rows are what
keeps the batch full), within the token budget. While another tenant's rows decode, one tenant's
prefills together get at most `prefill_rows_per_tenant` such chunks a step (issue 25, #6).

With `blocks` (the paged KV pool), memory is a resource too: a row is admitted only when its
prefix and first chunk fit, a chunk is cut to the blocks available, and when decode rows need
more blocks than are left, rows are preempted (the last slot first, recomputed later).
"""

from collections import Counter, deque
from collections.abc import Callable
from typing import Generic

from server.engine.schedule_types import BlockBudget, HasId, R, RowWork, ScheduledBatch, SlotMove

__all__ = ["BlockBudget", "HasId", "RowWork", "ScheduledBatch", "Scheduler", "SlotMove"]
_UNBOUNDED = 1 << 62  # a cap that never binds


class Scheduler(Generic[R]):
    """Fair admission bounded by `max_rows` running rows and a per-step token budget
    (`max_num_tokens`, None: unbounded, every prompt in one step). The queue is unbounded here:
    its bound is the front door's (engine/admission.py)."""

    def __init__(
        self,
        max_rows: int,
        tenant_of: Callable[[R], str] | None = None,
        num_tokens_of: Callable[[R], int] | None = None,
        max_num_tokens: int | None = None,
        max_rows_per_tenant: int | None = None,
        blocks: BlockBudget[R] | None = None,
        max_stall: float | None = None,
        min_prefill_tokens: int = 32,
        prefill_rows_per_tenant: int | None = None,
    ) -> None:
        self.max_rows = max_rows
        self.blocks = blocks
        self.tenant_of = tenant_of  # when set, admission goes round-robin over tenants
        self.num_tokens_of = num_tokens_of or (lambda r: 1)  # tokens to feed on admission
        self.max_num_tokens = max_num_tokens
        self.max_stall = max_stall  # None: a row's prefill chunk is bounded by the step's budget alone
        self.min_prefill_tokens = min_prefill_tokens
        self._chunk_cap = _UNBOUNDED  # this step's cap on one row's prefill chunk
        self.prefill_rows_per_tenant = prefill_rows_per_tenant  # None: a tenant's chunks are not capped
        self._prefill_used: Counter[str] = Counter()  # tenant -> prefill tokens this step
        self._decode_tenants: set[str] = set()  # tenants with a decode row this step
        self.max_rows_per_tenant = max_rows_per_tenant
        self._last_served: dict[str, int] = {}  # tenant -> admission number (tenants waiting only)
        self._num_admitted = 0
        self._computed: dict[str, int] = {}  # request id -> tokens in its slot after the last step
        self._targets: dict[str, int] = {}  # request id -> tokens to feed before it decodes
        self.waiting: deque[R] = deque()
        self.running: list[R] = []  # index == slot
        self.paused: set[str] = set()  # running rows whose reader is behind: they keep the slot, skip steps
        self.num_last_rows = 0  # rows the last `schedule()` planned (0: nothing could run)

    @property
    def is_idle(self) -> bool:
        """Nothing to compute: no request waits and every running row (if any) is paused."""
        return not self.waiting and all(r.request_id in self.paused for r in self.running)

    def add(self, request: R) -> None:
        self.waiting.append(request)

    def num_computed(self, request: R) -> int:
        """Tokens of a running row in its slot (prefix excluded) once the scheduled step ran."""
        return self._computed.get(request.request_id, 0)

    def schedule(self) -> ScheduledBatch[R]:
        """Plan one step: preempt for fairness, every decode row, prefill chunks, admissions."""
        num_for_fairness, moves = self._preempt_for_fairness()
        for_blocks = self._preempt_for_blocks()
        for victim in for_blocks:
            moves += self.retire({victim.request_id})
            self.waiting.appendleft(victim)
        num_for_blocks = len(for_blocks)
        budget = self.max_num_tokens if self.max_num_tokens is not None else 1 << 62
        left = {
            r.request_id: self._targets[r.request_id] - self._computed[r.request_id] for r in self.running
        }
        # decode rows feed their last sampled token, always; prefills under way continue first
        rows = [
            self._take(r, slot, 1)
            for slot, r in enumerate(self.running)
            if left[r.request_id] <= 0 and r.request_id not in self.paused
        ]
        num_decode, budget = len(rows), budget - len(rows)
        self._chunk_cap = self.chunk_cap(num_decode)
        self._prefill_used = Counter()
        self._decode_tenants = {self._tenant(row.request) for row in rows}
        # prefills under way: each tenant's fair chunk, taken now (their blocks before any admission's)
        chunks = self._prefill_chunks(left, budget)
        continuing = len(rows)
        for slot, request in enumerate(self.running):
            if request.request_id in chunks:
                rows.append(self._take(request, slot, chunks[request.request_id]))
        budget -= sum(chunks.values())
        admitted: list[R] = []
        held = self._running_per_tenant()
        while self.waiting and budget > 0 and len(self.running) < self.max_rows:
            picked = self._next_waiting(held, self._tenants_without_prefill_room())
            if picked is None:
                break
            request = picked
            target = self.num_tokens_of(request)
            first_chunk = min(target, budget, self._chunk_cap, self._tenant_room(request))
            if self.blocks is not None and not self.blocks.admit(request, first_chunk):
                self.waiting.appendleft(request)  # no room for it yet: it stays first in line
                break
            self._prefill_used[self._tenant(request)] += first_chunk
            admitted.append(request)
            if self.tenant_of is not None:
                held[self.tenant_of(request)] += 1
            self.running.append(request)
            self._targets[request.request_id], self._computed[request.request_id] = target, 0
            rows.append(self._take(request, len(self.running) - 1, first_chunk))
            budget -= rows[-1].num_tokens
        end = len(rows) - len(admitted)
        rows[continuing:end] = self._top_up(left, rows[continuing:end], budget, len(admitted))
        self.num_last_rows = len(rows)
        return ScheduledBatch(rows, num_decode, admitted, moves, num_for_fairness, num_for_blocks)

    def chunk_cap(self, num_decode: int) -> int:
        """One row's prefill tokens in a step with `num_decode` decode rows (the budget aside)."""
        if self.max_stall is None or num_decode == 0:
            return _UNBOUNDED
        return max(self.min_prefill_tokens, int((self.max_stall - 1) * num_decode))

    def _top_up(
        self, left: dict[str, int], taken: list[RowWork[R]], budget: int, num_admitted: int
    ) -> list[RowWork[R]]:
        """The prefills under way, in slot order: their fair chunks (`taken`) topped up with the
        budget nobody new took (work-conserving), within the blocks they can get."""
        by_id = {row.request.request_id: row for row in taken}
        rows = []
        for slot, request in enumerate(self.running[: len(self.running) - num_admitted]):
            request_id = request.request_id
            if left[request_id] <= 0:
                continue
            row = by_id.get(request_id)
            chunk = 0 if row is None else row.num_tokens
            if row is not None:
                self._computed[request_id] = row.start  # taken again below, with the extra
            room = min(left[request_id], self._chunk_cap, self._room(request))
            extra = max(0, min(room - chunk, budget, self._tenant_room(request)))
            budget -= extra
            self._prefill_used[self._tenant(request)] += extra
            if chunk + extra > 0:
                rows.append(self._take(request, slot, chunk + extra))
        return rows

    def _prefill_chunks(self, left: dict[str, int], budget: int) -> dict[str, int]:
        """Tokens of each prefill under way this step, in slot order, each tenant (those with a
        prefill under way, or waiting while a slot is free) within an equal share of `budget`: one
        tenant's long prompts cannot take every step's whole budget while another's wait."""
        tenant_of = self._tenant
        under_way = [r for r in self.running if left[r.request_id] > 0]
        tenants = {tenant_of(r) for r in under_way}
        if len(self.running) < self.max_rows:
            tenants |= {tenant_of(r) for r in self.waiting}
        share = max(1, budget // max(1, len(tenants)))
        quota = {t: min(share, self._cap_of(t)) for t in tenants}
        chunks: dict[str, int] = {}
        for request in under_way:
            tenant = tenant_of(request)
            room = min(self._chunk_cap, quota[tenant], self._room(request))
            chunk = min(left[request.request_id], budget, room)
            if chunk > 0:
                chunks[request.request_id] = chunk
                quota[tenant] -= chunk
                budget -= chunk
                self._prefill_used[tenant] += chunk
        return chunks

    def _tenant(self, request: R) -> str:
        return self.tenant_of(request) if self.tenant_of is not None else ""

    def _cap_of(self, tenant: str) -> int:
        """A tenant's prefill tokens this step: `prefill_rows_per_tenant` chunks, only while the
        chunk is capped and another tenant's rows decode (they are the ones its prefill would stall)."""
        rows = self.prefill_rows_per_tenant
        if rows is None or self._chunk_cap >= _UNBOUNDED or not self._decode_tenants - {tenant}:
            return _UNBOUNDED
        return rows * self._chunk_cap

    def _tenant_room(self, request: R) -> int:
        """Prefill tokens the request's tenant may still add this step."""
        tenant = self._tenant(request)
        return self._cap_of(tenant) - self._prefill_used[tenant]

    def _tenants_without_prefill_room(self) -> set[str]:
        return {t for t, used in self._prefill_used.items() if used >= self._cap_of(t)}

    def _take(self, request: R, slot: int, num_tokens: int) -> RowWork[R]:
        """Schedule `num_tokens` more of a row (a decode row: its one token)."""
        request_id = request.request_id
        start = self._computed[request_id]
        if self.blocks is not None and not self.blocks.grow(request, start + num_tokens):
            raise RuntimeError(f"no KV blocks for {num_tokens} more tokens of {request_id}")
        self._computed[request_id] = start + num_tokens
        return RowWork(
            request, slot, start, num_tokens, samples=start + num_tokens >= self._targets[request_id]
        )

    def _room(self, request: R) -> int:
        """Tokens a prefilling row may add under the free blocks."""
        if self.blocks is None:
            return 1 << 62
        return self.blocks.room(request) - self._computed[request.request_id]

    def _preempt_for_blocks(self) -> list[R]:
        """Rows to preempt (the last slot first) until every decode row, and the first prefilling
        row (so that something always moves), can grow by one token."""
        if self.blocks is None:
            return []
        victims: list[R] = []
        running = list(self.running)
        while running:
            active = [r for r in running if r.request_id not in self.paused]
            growing = [r for r in active if self._targets[r.request_id] <= self._computed[r.request_id]]
            growing += [r for r in active if self._targets[r.request_id] > self._computed[r.request_id]][:1]
            needed = sum(self.blocks.num_needed(r, self._computed[r.request_id] + 1) for r in growing)
            if needed <= self.blocks.num_available:
                break
            victim = running.pop()
            self.blocks.free(victim)  # its blocks count as available for the next round
            victims.append(victim)
        return victims

    def _running_per_tenant(self) -> Counter[str]:
        if self.tenant_of is None:
            return Counter()
        return Counter(self.tenant_of(r) for r in self.running)

    def _limit(self) -> int:
        """Rows one tenant is entitled to: the cap, and a fair share of the slots when others wait."""
        limit = self.max_rows_per_tenant or self.max_rows
        if self.tenant_of is not None:
            tenants = {self.tenant_of(r) for r in self.running} | {self.tenant_of(r) for r in self.waiting}
            if len(tenants) > 1:
                limit = min(limit, max(1, self.max_rows // len(tenants)))
        return limit

    def _next_waiting(self, held: Counter[str], excluded: set[str]) -> R | None:
        """FIFO, or with tenants: the oldest request of the least recently served tenant among
        those under their row limit (`max_rows_per_tenant` is a hard cap), so a tenant with a long
        queue never delays another tenant's request by more than one round. Tenants in `excluded`
        (no prefill room left this step) wait for the next step."""
        if self.tenant_of is None:  # one tenant: never capped (no other tenant's rows to stall)
            return self.waiting.popleft()
        cap, share = self.max_rows_per_tenant or self.max_rows, self._limit()
        first: dict[str, int] = {}
        for index, request in enumerate(self.waiting):
            first.setdefault(self.tenant_of(request), index)
        # below the fair share first; a free slot nobody below it wants still goes to someone
        # (work-conserving: preemption takes it back when another tenant arrives)
        first = {t: i for t, i in first.items() if t not in excluded}
        eligible = [t for t in first if held[t] < share] or [t for t in first if held[t] < cap]
        if not eligible:
            return None
        tenant = min(eligible, key=lambda t: (self._last_served.get(t, -1), first[t]))
        request = self.waiting[first[tenant]]
        del self.waiting[first[tenant]]
        self._num_admitted += 1
        self._last_served[tenant] = self._num_admitted
        if len(self._last_served) > 2 * len(first):  # forget tenants that stopped waiting
            self._last_served = {t: n for t, n in self._last_served.items() if t in first}
        return request

    def _preempt_for_fairness(self) -> tuple[int, list[SlotMove]]:
        """With no free slot and a tenant waiting below its limit, take back slots from tenants
        above theirs (their newest rows go back to the head of the queue and are recomputed
        later): another tenant's request then starts within one step, not when a hog finishes.
        Returns how many rows it preempted and the slot moves."""
        if self.tenant_of is None or not self.waiting or len(self.running) < self.max_rows:
            return 0, []
        tenant_of, limit = self.tenant_of, self._limit()
        held = self._running_per_tenant()
        starved = {tenant_of(r) for r in self.waiting if held[tenant_of(r)] < limit}
        victims: list[R] = []
        for _ in starved:
            over = [t for t, n in held.items() if n > limit]
            if not over:
                break
            hog = max(over, key=lambda t: held[t])
            victims.append(
                next(r for r in reversed(self.running) if tenant_of(r) == hog and r not in victims)
            )
            held[hog] -= 1
        if not victims:
            return 0, []
        moves = self.retire({r.request_id for r in victims})
        self.waiting.extendleft(reversed(victims))  # back at the head: FIFO within the tenant holds
        return len(victims), moves

    def slot_of(self, request: R) -> int:
        """The slot of a running request (by identity)."""
        return next(slot for slot, r in enumerate(self.running) if r is request)

    def remove_waiting(self, request_id: str) -> R | None:
        """Drop a waiting request (client went away); returns it if it was waiting."""
        for index, request in enumerate(self.waiting):
            if request.request_id == request_id:
                del self.waiting[index]
                return request
        return None

    def retire(self, finished: set[str]) -> list[SlotMove]:
        """Remove finished rows; fill each hole with the current last row.

        Returns the moves to apply, in order.
        """
        if self.blocks is not None:
            for request in self.running:
                if request.request_id in finished:
                    self.blocks.free(request)
        moves: list[SlotMove] = []
        slot = 0
        while slot < len(self.running):
            if self.running[slot].request_id not in finished:
                slot += 1
                continue
            last = self.running.pop()
            if slot < len(self.running):
                self.running[slot] = last
                if last.request_id not in finished:
                    moves.append(SlotMove(last.request_id, src=len(self.running), dst=slot))
                # re-check this slot: the row moved in may itself be finished
        for request_id in finished:
            self._computed.pop(request_id, None)
            self._targets.pop(request_id, None)
            self.paused.discard(request_id)
        return moves
