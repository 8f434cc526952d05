# -*- test-case-name: tests.test_status -*-
"""
Tests for the status rules: L{claudemesh.broker.status} as pure functions,
then the same rules through the broker core (sources, freshness, dnd,
acting on sibling sessions, summaries and groups).
"""

from twisted.trial import unittest

from claudemesh.broker.status import (
    DELIVERABLE,
    StatusState,
    apply_signal,
    decay,
    may_receive,
)
from claudemesh.protocol import Refusal
from tests.meshfixture import BrokerFixture

WINDOW = 30_000
T0 = 1_000_000


class ApplySignalTests(unittest.TestCase):
    def test_higher_rank_replaces(self):
        """A hook signal replaces a manual status at once."""
        new = apply_signal(StatusState("idle", "manual", T0), "working", "hook", T0 + 1, WINDOW)
        self.assertEqual(new, StatusState("working", "hook", T0 + 1))

    def test_equal_rank_replaces(self):
        """A signal of the same rank replaces the status."""
        new = apply_signal(StatusState("working", "jsonl", T0), "idle", "jsonl", T0 + 1, WINDOW)
        self.assertEqual(new, StatusState("idle", "jsonl", T0 + 1))

    def test_lower_rank_ignored_while_fresh(self):
        """A manual signal disagreeing with a hook inside the fresh window changes nothing."""
        current = StatusState("working", "hook", T0)
        self.assertIsNone(apply_signal(current, "idle", "manual", T0 + WINDOW, WINDOW))

    def test_lower_rank_applies_when_stale(self):
        """A lower-rank signal applies once the current status is older than the window."""
        current = StatusState("working", "hook", T0)
        new = apply_signal(current, "idle", "jsonl", T0 + WINDOW + 1, WINDOW)
        self.assertEqual(new, StatusState("idle", "jsonl", T0 + WINDOW + 1))

    def test_agreeing_lower_rank_refreshes(self):
        """A fresh hook's status confirmed by jsonl keeps its source and gets the new time."""
        current = StatusState("working", "hook", T0)
        new = apply_signal(current, "working", "jsonl", T0 + 10_000, WINDOW)
        self.assertEqual(new, StatusState("working", "hook", T0 + 10_000))

    def test_dnd_only_cleared_manually(self):
        """dnd survives hook and jsonl signals and is cleared by a manual one."""
        current = StatusState("dnd", "manual", T0)
        self.assertIsNone(apply_signal(current, "idle", "hook", T0 + 1, WINDOW))
        self.assertIsNone(apply_signal(current, "working", "jsonl", T0 + WINDOW * 10, WINDOW))
        self.assertEqual(apply_signal(current, "idle", "manual", T0 + 1, WINDOW),
                         StatusState("idle", "manual", T0 + 1))

    def test_decay(self):
        """working decays to idle (source jsonl) after the TTL, not before; idle never decays."""
        current = StatusState("working", "hook", T0)
        self.assertIsNone(decay(current, T0 + 59_999, 60_000))
        self.assertEqual(decay(current, T0 + 60_000, 60_000), StatusState("idle", "jsonl",
                                                                         T0 + 60_000))
        self.assertIsNone(decay(StatusState("idle", "manual", T0), T0 + 10**9, 60_000))
        self.assertIsNone(decay(StatusState("dnd", "manual", T0), T0 + 10**9, 60_000))

    def test_gating(self):
        """idle receives every priority; working and dnd only now."""
        self.assertEqual(DELIVERABLE["idle"], ("now", "next", "low"))
        for status in ("working", "dnd"):
            self.assertTrue(may_receive(status, "now"))
            self.assertFalse(may_receive(status, "next"))
            self.assertFalse(may_receive(status, "low"))


class CoreStatusTestCase(unittest.TestCase):
    def setUp(self):
        self.fx = BrokerFixture()
        self.owner = self.fx.create_mesh()
        self.alice = self.fx.add_member(self.owner, "alice")
        self.bob = self.fx.add_member(self.owner, "bob")

    def hook(self, peer, status, session_id):
        body = ('{"status": "%s", "session_id": "%s", "cwd": "", "pid": 0}'
                % (status, session_id)).encode()
        from claudemesh import crypto

        ts = self.fx.now_ms()
        signature = peer.identity.sign(crypto.hook_string(peer.mesh.id, ts, body))
        results = []
        self.fx.broker.hooks.report(peer.mesh.id, peer.pubkey, str(ts), signature,
                                       body).addBoth(results.append)
        self.fx.flush()
        return results[0]

    def status(self, session):
        return (session.status.status, session.status.source)


class SourceRuleTests(CoreStatusTestCase):
    def test_hook_beats_manual_in_window(self):
        """A manual signal within the fresh window after a hook is ignored."""
        self.alice.connect(session_id="a")
        self.hook(self.alice, "working", "a")
        self.fx.advance(10)
        self.alice.request({"type": "set_status", "status": "idle"})
        self.assertEqual(self.status(self.alice.session), ("working", "hook"))

    def test_manual_applies_after_window(self):
        """A manual signal after the fresh window replaces the hook's status."""
        self.alice.connect(session_id="a")
        self.hook(self.alice, "working", "a")
        # Past the 30 s window, before the 60 s TTL decay.
        self.fx.advance(31)
        self.alice.request({"type": "set_status", "status": "idle"})
        self.assertEqual(self.status(self.alice.session), ("idle", "manual"))

    def test_stale_hook_yields_to_jsonl(self):
        """A hook status older than the window yields to a jsonl signal."""
        self.alice.connect(session_id="a")
        self.hook(self.alice, "working", "a")
        self.fx.advance(31)
        self.alice.request({"type": "set_status", "status": "idle", "source": "jsonl"})
        self.assertEqual(self.status(self.alice.session), ("idle", "jsonl"))

    def test_agreeing_jsonl_prevents_decay(self):
        """jsonl re-sending the hook's working keeps it from decaying past the TTL."""
        self.alice.connect(session_id="a")
        self.hook(self.alice, "working", "a")
        for _ in range(6):
            self.fx.advance(25)
            self.alice.request({"type": "set_status", "status": "working", "source": "jsonl"})
        # 150 s later: still working, still attributed to the hook.
        self.assertEqual(self.status(self.alice.session), ("working", "hook"))
        self.fx.advance(61)
        self.assertEqual(self.alice.session.status.status, "idle")

    def test_hook_never_clears_dnd(self):
        """A hook idle leaves a manual dnd in place."""
        self.alice.connect(session_id="a")
        self.alice.request({"type": "set_status", "status": "dnd"})
        self.hook(self.alice, "idle", "a")
        self.assertEqual(self.status(self.alice.session), ("dnd", "manual"))

    def test_manual_clears_dnd(self):
        """A manual idle clears dnd and releases held messages."""
        self.alice.connect(session_id="a")
        self.bob.connect()
        self.alice.request({"type": "set_status", "status": "dnd"})
        self.bob.send(self.alice.pubkey, priority="next")
        self.assertEqual(self.alice.connection.messages(), [])
        self.alice.request({"type": "set_status", "status": "idle"})
        self.assertEqual(self.status(self.alice.session), ("idle", "manual"))
        self.assertEqual(len(self.alice.connection.messages()), 1)

    def test_jsonl_cannot_set_over_fresh_manual(self):
        """A jsonl signal disagreeing with a fresh manual status is ignored."""
        self.alice.connect(session_id="a")
        self.alice.request({"type": "set_status", "status": "working"})
        self.alice.request({"type": "set_status", "status": "idle", "source": "jsonl"})
        self.assertEqual(self.status(self.alice.session), ("working", "manual"))

    def test_hook_source_not_accepted_over_ws(self):
        """set_status with source hook is malformed: hook only arrives through the route."""
        from claudemesh import protocol

        self.assertRaises(protocol.Refusal, protocol.decode,
                          '{"type": "set_status", "status": "idle", "source": "hook"}')


class TargetTests(CoreStatusTestCase):
    def setUp(self):
        CoreStatusTestCase.setUp(self)
        self.alice.connect(session_id="a1")
        self.first = self.alice.session
        first_connection = self.alice.connection
        self.alice.connect(session_id="a2")
        self.second = self.alice.session
        self.alice.session, self.alice.connection = self.first, first_connection
        self.bob.connect(session_id="b1")
        self.bob_session = self.bob.session

    def test_sibling_session(self):
        """set_status with the sessionId of a sibling session of the same member sets that one."""
        self.alice.request({"type": "set_status", "status": "working", "sessionId": "a2"})
        self.assertEqual((self.first.status.status, self.second.status.status),
                         ("idle", "working"))

    def test_other_members_session(self):
        """set_status with another member's sessionId is refused not_found; nothing changes."""
        reply = self.alice.request({"type": "set_status", "status": "dnd", "sessionId": "b1"})
        self.assertIsInstance(reply, Refusal)
        self.assertEqual(reply.code, "not_found")
        self.assertEqual(self.bob_session.status.status, "idle")
        self.assertEqual(self.first.status.status, "idle")

    def test_all(self):
        """all:true sets every session of the caller's member and no one else's."""
        self.alice.request({"type": "set_status", "status": "dnd", "all": True})
        self.assertEqual((self.first.status.status, self.second.status.status,
                          self.bob_session.status.status), ("dnd", "dnd", "idle"))

    def test_summary_sibling(self):
        """set_summary with a sibling's sessionId sets that session's summary only."""
        self.alice.request({"type": "set_summary", "summary": "refactoring", "sessionId": "a2"})
        self.assertEqual((self.first.summary, self.second.summary), (None, "refactoring"))

    def test_summary_other_member(self):
        """set_summary with another member's sessionId is refused not_found."""
        reply = self.alice.request({"type": "set_summary", "summary": "x", "sessionId": "b1"})
        self.assertEqual(reply.code, "not_found")
        self.assertIsNone(self.bob_session.summary)

    def test_summary_all(self):
        """set_summary all:true sets every session of the member, and list_peers shows it."""
        self.alice.request({"type": "set_summary", "summary": "shipping", "all": True})
        self.assertEqual((self.first.summary, self.second.summary, self.bob_session.summary),
                         ("shipping", "shipping", None))
        peers = self.bob.request({"type": "list_peers"})["peers"]
        self.assertEqual(sorted((p["sessionId"], p["summary"]) for p in peers),
                         [("a1", "shipping"), ("a2", "shipping"), ("b1", None)])


class GroupTests(CoreStatusTestCase):
    def test_join_then_group_delivery(self):
        """After join_group, @group messages reach the session."""
        self.alice.connect()
        self.bob.connect()
        self.alice.send("@ops")
        self.assertEqual(self.bob.connection.messages(), [])
        self.bob.request({"type": "join_group", "name": "ops"})
        self.alice.send("@ops")
        self.assertEqual(len(self.bob.connection.messages()), 1)
        [peer] = [p for p in self.alice.request({"type": "list_peers"})["peers"]
                  if p["displayName"] == "bob"]
        self.assertEqual(peer["groups"], [{"name": "ops"}])

    def test_leave_stops_group_delivery(self):
        """After leave_group, @group messages no longer reach the session."""
        self.alice.connect()
        self.bob.connect(groups=["ops"])
        self.alice.send("@ops")
        self.assertEqual(len(self.bob.connection.messages()), 1)
        self.bob.request({"type": "leave_group", "name": "ops"})
        self.bob.connection.clear()
        ack = self.alice.send("@ops")
        self.assertEqual(self.bob.connection.messages(), [])
        # No member matched: nothing was queued for bob either.
        reply = self.alice.request({"type": "message_status", "messageId": ack["messageId"]})
        self.assertEqual(reply["recipients"], [])

    def test_join_group_with_role(self):
        """join_group records the role, shown in list_peers."""
        self.alice.connect()
        self.alice.request({"type": "join_group", "name": "team/backend", "role": "lead"})
        [peer] = self.alice.request({"type": "list_peers"})["peers"]
        self.assertEqual(peer["groups"], [{"name": "team/backend", "role": "lead"}])
