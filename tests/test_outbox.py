# -*- test-case-name: tests.test_outbox -*-
"""
Tests for L{claudemesh.broker.outbox}: one test per transition of the
outbox state machine, driven with plain Deferreds (no reactor, no store).
"""

from automat import NoTransition
from twisted.internet import defer
from twisted.trial import unittest

from claudemesh.broker.outbox import OutboxCore, new_outbox


class Rig:
    """
    An outbox whose claims, pushes and socket are scripted by the test.
    """

    def __init__(self, batch_limit=3):
        self.claims = []
        self.pushed = []
        self.handed_back = []
        self.is_paused = False
        # After this many pushes the socket reports itself paused.
        self.pause_after = None
        self.open = True
        self.core = OutboxCore(claim=self._claim, push=self._push,
                               is_paused=lambda: self.is_paused,
                               hand_back=self.handed_back.extend, batch_limit=batch_limit)
        self.outbox = new_outbox(self.core)

    def _claim(self):
        d = defer.Deferred()
        self.claims.append(d)
        return d

    def _push(self, row):
        if not self.open:
            return False
        self.pushed.append(row)
        if self.pause_after is not None and len(self.pushed) >= self.pause_after:
            self.is_paused = True
        return True

    def land(self, rows):
        """
        The claim in flight comes back with C{rows}.
        """
        self.claims[-1].callback(list(rows))

    @property
    def state(self):
        return self.outbox.state()


class IdleTests(unittest.TestCase):
    def test_starts_idle(self):
        """A new outbox is idle and claims nothing on its own."""
        rig = Rig()
        self.assertEqual((rig.state, rig.claims), ("idle", []))

    def test_wake_claims(self):
        """idle --wake--> claiming: one claim is queued."""
        rig = Rig()
        rig.outbox.wake()
        self.assertEqual((rig.state, len(rig.claims)), ("claiming", 1))

    def test_take_fresh(self):
        """idle --take_fresh--> idle: a fresh delivery may go straight out."""
        rig = Rig()
        self.assertTrue(rig.outbox.take_fresh())
        self.assertEqual(rig.state, "idle")

    def test_writable(self):
        """idle --writable--> idle: nothing happens."""
        rig = Rig()
        rig.outbox.writable()
        self.assertEqual((rig.state, rig.claims), ("idle", []))

    def test_close(self):
        """idle --close--> closed."""
        rig = Rig()
        rig.outbox.close()
        self.assertEqual(rig.state, "closed")

    def test_unexpected(self):
        """Inputs idle cannot meet raise NoTransition."""
        rig = Rig()
        for name in ("claimed", "claim_failed", "resume", "pushed", "paused"):
            args = ([],) if name == "claimed" else ()
            self.assertRaises(NoTransition, getattr(rig.outbox, name), *args)


class ClaimingTests(unittest.TestCase):
    def setUp(self):
        self.rig = Rig()
        self.rig.outbox.wake()

    def test_wake_claims_again_later(self):
        """claiming --wake--> claiming: no second claim now, one after this claim's rows."""
        self.rig.outbox.wake()
        self.assertEqual(len(self.rig.claims), 1)
        self.rig.land(["a"])
        self.assertEqual(self.rig.pushed, ["a"])
        self.assertEqual((self.rig.state, len(self.rig.claims)), ("claiming", 2))

    def test_take_fresh_refused(self):
        """claiming --take_fresh--> claiming: no, a fresh delivery could overtake the claim."""
        self.assertFalse(self.rig.outbox.take_fresh())
        self.assertEqual(self.rig.state, "claiming")

    def test_claimed_pushes_in_order(self):
        """claiming --claimed--> pushing --pushed--> idle: the rows go out in claim order."""
        self.rig.land(["a", "b"])
        self.assertEqual((self.rig.pushed, self.rig.state), (["a", "b"], "idle"))
        self.assertEqual(len(self.rig.claims), 1)

    def test_claimed_nothing(self):
        """An empty claim leaves the outbox idle, ready for fresh deliveries."""
        self.rig.land([])
        self.assertEqual(self.rig.state, "idle")
        self.assertTrue(self.rig.outbox.take_fresh())

    def test_full_batch_claims_again(self):
        """A claim that fills its batch is followed by another one."""
        self.rig.land(["a", "b", "c"])
        self.assertEqual((self.rig.state, len(self.rig.claims)), ("claiming", 2))
        self.rig.land(["d"])
        self.assertEqual((self.rig.pushed, self.rig.state), (["a", "b", "c", "d"], "idle"))

    def test_claim_failed(self):
        """claiming --claim_failed--> idle, logged; the next wake claims again."""
        self.rig.claims[-1].errback(RuntimeError("store down"))
        self.assertEqual(self.rig.state, "idle")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.rig.outbox.wake()
        self.assertEqual(len(self.rig.claims), 2)

    def test_writable(self):
        """claiming --writable--> claiming: nothing happens."""
        self.rig.outbox.writable()
        self.assertEqual(self.rig.state, "claiming")

    def test_close_then_rows_go_back(self):
        """claiming --close--> closed; the claim's rows, landing later, are handed back."""
        self.rig.outbox.close()
        self.assertEqual(self.rig.state, "closed")
        self.rig.land(["a", "b"])
        self.assertEqual((self.rig.pushed, self.rig.handed_back), ([], ["a", "b"]))

    def test_unexpected(self):
        """Inputs claiming cannot meet raise NoTransition."""
        for name in ("resume", "pushed", "paused"):
            self.assertRaises(NoTransition, getattr(self.rig.outbox, name))


class PushingAndPausedTests(unittest.TestCase):
    def setUp(self):
        self.rig = Rig(batch_limit=10)
        self.rig.pause_after = 1
        self.rig.outbox.wake()
        self.rig.land(["a", "b", "c"])

    def test_paused_keeps_the_rest(self):
        """pushing --paused--> paused: a full socket buffer stops the pushes, the rest waits."""
        self.assertEqual((self.rig.pushed, self.rig.state), (["a"], "paused"))
        self.assertEqual(list(self.rig.core.rows), ["b", "c"])

    def test_writable_resumes(self):
        """paused --writable--> pushing: the rest goes out in order once the socket drained."""
        self.rig.pause_after = None
        self.rig.is_paused = False
        self.rig.outbox.writable()
        self.assertEqual((self.rig.pushed, self.rig.state), (["a", "b", "c"], "idle"))

    def test_wake_while_paused(self):
        """paused --wake--> paused: nothing now, a claim once the rest is out."""
        self.rig.outbox.wake()
        self.assertEqual((self.rig.state, len(self.rig.claims)), ("paused", 1))
        self.rig.pause_after = None
        self.rig.is_paused = False
        self.rig.outbox.writable()
        self.assertEqual((self.rig.state, len(self.rig.claims)), ("claiming", 2))

    def test_take_fresh_refused_while_paused(self):
        """paused --take_fresh--> paused: no."""
        self.assertFalse(self.rig.outbox.take_fresh())
        self.assertEqual(self.rig.state, "paused")

    def test_close_drops_the_rest(self):
        """paused --close--> closed: the rows left are dropped (leases go with the session's)."""
        self.rig.outbox.close()
        self.assertEqual((self.rig.state, list(self.rig.core.rows)), ("closed", []))
        self.rig.outbox.writable()
        self.assertEqual(self.rig.pushed, ["a"])

    def test_unexpected(self):
        """Inputs paused cannot meet raise NoTransition."""
        self.assertRaises(NoTransition, self.rig.outbox.claimed, [])
        for name in ("claim_failed", "resume", "pushed", "paused"):
            self.assertRaises(NoTransition, getattr(self.rig.outbox, name))


class PushingReentrancyTests(unittest.TestCase):
    def test_wake_during_push(self):
        """pushing --wake--> pushing: a wake fed while rows are pushed claims after them."""
        rig = Rig()
        pushes = []

        def push(row):
            pushes.append(row)
            if row == "a":
                rig.outbox.wake()
            return True

        rig.core.push = push
        rig.outbox.wake()
        rig.land(["a", "b"])
        self.assertEqual(pushes, ["a", "b"])
        self.assertEqual((rig.state, len(rig.claims)), ("claiming", 2))

    def test_connection_gone_during_push(self):
        """A push the connection no longer takes stops the loop; the close that follows closes."""
        rig = Rig()
        rig.outbox.wake()

        def push(row):
            rig.outbox.close()
            return False

        rig.core.push = push
        rig.land(["a", "b"])
        self.assertEqual(rig.state, "closed")
        self.assertEqual(list(rig.core.rows), [])

    def test_writable_while_pushing(self):
        """pushing --writable--> pushing: nothing more happens."""
        rig = Rig()

        def push(row):
            rig.outbox.writable()
            return True

        rig.core.push = push
        rig.outbox.wake()
        rig.land(["a", "b"])
        self.assertEqual((rig.state, rig.claims[1:]), ("idle", []))

    def test_no_answers_from_inside_a_push(self):
        """take_fresh and state cannot be asked from inside a push (automat refuses)."""
        rig = Rig()
        errors = []

        def push(row):
            for question in (rig.outbox.take_fresh, rig.outbox.state):
                try:
                    question()
                except RuntimeError as e:
                    errors.append(str(e).split(" but ")[0])
            return True

        rig.core.push = push
        rig.outbox.wake()
        rig.land(["a"])
        self.assertEqual(len(errors), 2)


class ClosedTests(unittest.TestCase):
    def test_closed_ignores(self):
        """closed: wakes, writable, failures and a second close do nothing; no fresh deliveries."""
        rig = Rig()
        rig.outbox.close()
        rig.outbox.wake()
        rig.outbox.writable()
        rig.outbox.claim_failed()
        rig.outbox.close()
        self.assertFalse(rig.outbox.take_fresh())
        self.assertEqual((rig.state, rig.claims), ("closed", []))
        rig.outbox.claimed([])
        self.assertEqual(rig.handed_back, [])

    def test_unexpected(self):
        """Inputs closed cannot meet raise NoTransition."""
        rig = Rig()
        rig.outbox.close()
        for name in ("resume", "pushed", "paused"):
            self.assertRaises(NoTransition, getattr(rig.outbox, name))
