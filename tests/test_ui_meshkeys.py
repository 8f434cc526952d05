"""
C{claudemesh ui} and mesh key epochs (issue 17): invites from the page with
the current key, its epoch and its check value; a ban from the page rotating
the key; the rotate action; the departures notice for owners and admins; and
the page's own messages sealed and opened by epoch.

The first half runs the UI server over a fake client on a L{task.Clock} (as
C{tests.test_ui_server}); the second a real L{MeshWatch} against a real
broker on 127.0.0.1, with real members.
"""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from claudemesh import crypto
from claudemesh.client import connection, messages
from claudemesh.webui import watch
from tests import test_meshkeys_client
from tests.test_client_broker import wait_until
from tests.test_ui_server import UITestCase, bob_rows


class UIInviteTests(UITestCase):
    def sealed_for_me(self, epoch, key, role="admin"):
        """
        A C{mesh_key} reply: C{key} sealed for the page's member by a new
        key the member list shows with C{role}.
        """
        sealer = crypto.Identity.generate()
        self.clients[0].replies["list_members"]["members"].append(
            {"name": "carol", "memberPubkey": sealer.pubkey, "role": role})
        return {"type": "mesh_key", "epoch": epoch, "sealedBy": sealer.pubkey,
                "sealedKey": crypto.seal_mesh_key(sealer, self.entry.pubkey, self.entry.meshId,
                                                  epoch, key)}

    def test_invite_carries_the_check_value(self):
        """The page's invite is signed with the check value of the key its link carries."""
        self.connected()
        self.clients[0].replies["create_invite"] = {"inviteId": "inv1",
                                                    "expiresAt": 1_900_000_000}
        document = self.json(self.post("/api/invite", {"role": "member"}))
        parsed = messages.parse_invite_link(document["link"])
        self.assertEqual(parsed.invite["meshKeyCheck"],
                         crypto.mesh_key_check(self.entry.mesh_key, self.entry.meshId))
        self.assertIs(parsed.key_checked, True)
        self.assertEqual(document["keyEpoch"], 0)

    def test_invite_after_rotation_waits_for_the_key(self):
        """An invite asked while the current epoch's copy is fetched carries that key, checked."""
        self.connected()
        client = self.clients[0]
        rotated = crypto.new_mesh_key()
        answer = defer.Deferred()
        plain = client.request
        client.request = lambda frame, timeout=None: (
            answer if frame["type"] == "get_mesh_key" else plain(frame, timeout))
        client.replies["create_invite"] = {"inviteId": "inv2", "expiresAt": 1_900_000_000}
        client.mesh_keys.hello({"keyEpoch": 4})
        pending = self.http.post(
            "http://127.0.0.1:7777/api/invite", data=b'{"role": "member"}',
            headers={"Origin": "http://127.0.0.1:7777", "Content-Type": "application/json",
                     "Authorization": "Bearer " + self.gate.token})
        self.assertNoResult(pending)
        answer.callback(self.sealed_for_me(4, rotated))
        self.http.flush()
        document = self.json(self.successResultOf(pending))
        parsed = messages.parse_invite_link(document["link"])
        self.assertTrue(document["link"].endswith(".4"), document["link"])
        self.assertEqual((parsed.mesh_key, parsed.mesh_key_epoch, parsed.key_checked),
                         (rotated, 4, True))
        self.assertEqual(document["keyEpoch"], 4)


    def test_invite_with_a_forged_copy_refused(self):
        """A copy sealed by no owner or admin is refused; the invite says why, naming the epoch."""
        self.connected()
        client = self.clients[0]
        client.replies["create_invite"] = {"inviteId": "inv3", "expiresAt": 1_900_000_000}
        client.replies["get_mesh_key"] = self.sealed_for_me(4, crypto.new_mesh_key(),
                                                            role="member")
        client.mesh_keys.hello({"keyEpoch": 4})
        response = self.post("/api/invite", {"role": "member"})
        self.assertEqual(response.code, 409)
        self.assertIn("refused the mesh key of epoch 4: its copy was sealed by the key",
                      self.json(response)["message"])
        self.assertIsNone(client.mesh_keys.key_of(4))


class UIRotationTests(UITestCase):
    def setUp(self):
        UITestCase.setUp(self)
        self.view = self.connected()
        self.client = self.clients[0]
        members, _ = bob_rows(self.bob.pubkey)
        members["members"].append({"name": "owner", "memberPubkey": self.entry.pubkey,
                                   "role": "owner"})
        self.client.replies.update({
            "list_members": members, "ban": {"banned": "bob"},
            "rotate_mesh_key": {"type": "rotate_mesh_key_ack", "epoch": 1, "committed": True,
                                "members": 2}})

    def frames(self, kind):
        return [f for f in self.client.requests if f["type"] == kind]

    def test_ban_rotates_by_default(self):
        """A ban from the page rotates the key, with a copy for each remaining member."""
        document = self.json(self.post("/api/moderate", {"action": "ban", "target": "bob"}))
        self.assertEqual(document, {"banned": "bob",
                                    "rotated": {"epoch": 1, "members": ["bob", "owner"]}})
        [rotation] = self.frames("rotate_mesh_key")
        self.assertEqual((rotation["epoch"], rotation["reason"]), (1, "ban of bob"))
        self.assertEqual(sorted(c["memberPubkey"] for c in rotation["sealedKeys"]),
                         sorted([self.bob.pubkey, self.entry.pubkey]))
        keys = self.client.mesh_keys
        self.assertEqual((keys.current, keys.key_of(1) is not None), (1, True))
        self.assertEqual(self.view.presence()["meshKey"]["epoch"], 1)

    def test_ban_without_rotation(self):
        """rotate: false bans only; a rotate that is not a boolean is 400."""
        document = self.json(self.post("/api/moderate", {"action": "ban", "target": "bob",
                                                         "rotate": False}))
        self.assertEqual(document, {"banned": "bob"})
        self.assertEqual(self.frames("rotate_mesh_key"), [])
        response = self.post("/api/moderate", {"action": "ban", "target": "bob",
                                               "rotate": "no"})
        self.assertEqual(response.code, 400)
        self.assertEqual(len(self.frames("ban")), 1)

    def test_failed_rotation_reported_beside_the_ban(self):
        """A rotation refused after the ban: 200 with the ban and the rotation's error."""
        self.client.replies["rotate_mesh_key"] = connection.RequestError(
            "store_unavailable", "the store is unavailable")
        response = self.post("/api/moderate", {"action": "ban", "target": "bob"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.json(response), {"banned": "bob", "rotateError": {
            "error": "store_unavailable", "message": "the store is unavailable"}})

    def test_unban_after_a_rotating_ban_rotates(self):
        """
        An unban from the page rotates when the broker says the current key
        was made while the member was banned; otherwise, or with rotate:
        false, it only unbans and the page says what to do.
        """
        bob = {"name": "bob", "memberPubkey": self.bob.pubkey}
        self.client.replies.update({"unban": {"unbanned": "bob"}, "mesh_key_status": {
            "keyEpoch": 0, "keyStatus": {"unbannedSinceRotation": [bob]}}})
        document = self.json(self.post("/api/moderate", {"action": "unban", "target": "bob"}))
        self.assertEqual(document, {"unbanned": "bob",
                                    "rotated": {"epoch": 1, "members": ["bob", "owner"]}})
        self.assertEqual(self.frames("rotate_mesh_key")[0]["reason"], "unban of bob")
        self.assertIsNone(self.view.presence()["meshKey"]["notice"])
        document = self.json(self.post("/api/moderate", {"action": "unban", "target": "bob",
                                                         "rotate": False}))
        self.assertEqual(document, {"unbanned": "bob"})
        self.assertIn("bob was unbanned after the mesh key (epoch 1) was made without them",
                      self.view.presence()["meshKey"]["notice"])
        self.client.replies["mesh_key_status"] = {"keyEpoch": 1, "keyStatus": {}}
        document = self.json(self.post("/api/moderate", {"action": "unban", "target": "bob"}))
        self.assertEqual(document, {"unbanned": "bob"})
        self.assertEqual(len(self.frames("rotate_mesh_key")), 1)

    def test_rotate_key_action(self):
        """POST /api/rotate-key rotates with the reason given; a member's is refused 409."""
        document = self.json(self.post("/api/rotate-key", {"reason": "routine"}))
        self.assertEqual(document, {"epoch": 1, "members": ["bob", "owner"]})
        self.assertEqual(self.frames("rotate_mesh_key")[0]["reason"], "routine")
        self.assertEqual(self.post("/api/rotate-key", {"reason": "x\x00"}).code, 400)
        self.client.replies["rotate_mesh_key"] = connection.RequestError(
            "forbidden", "only owner or admin can rotate the mesh key")
        refused = self.post("/api/rotate-key", {})
        self.assertEqual((refused.code, self.json(refused)["error"]), (409, "forbidden"))


class UIDepartureNoticeTests(UITestCase):
    def status(self, *departed):
        return {"departedSinceRotation": list(departed), "departedTotal": len(departed),
                "withoutKey": []}

    def test_owner_told_until_someone_rotates(self):
        """Departures since the last rotation show for an owner until a rotation clears them."""
        view = self.ui.watch_for()
        client = self.clients[0]
        bob = {"name": "bob", "pubkey": self.bob.pubkey, "event": "banned",
               "at": "2027-01-01T00:00:00.000Z"}
        client.replies["mesh_key_status"] = {"keyEpoch": 0, "keyStatus": self.status(bob)}
        client.connect()
        self.clock.advance(0)
        key = view.presence()["meshKey"]
        self.assertEqual(key["notice"], "bob was banned since the mesh key was last rotated:"
                         " they can still read broadcasts sealed with it. Run 'claudemesh"
                         " rotate-key'.")
        # Someone rotates (the CLI, another admin): the event makes the page ask again.
        client.replies["mesh_key_status"] = {"keyEpoch": 1, "keyStatus": self.status()}
        view._event({"event": "mesh_key_rotated", "eventData": {"epoch": 1, "by": "ann"}})
        self.clock.advance(1)
        self.assertIsNone(view.presence()["meshKey"]["notice"])
        # A leave noticed at the next refresh.
        client.replies["mesh_key_status"] = {"keyEpoch": 1, "keyStatus": self.status(
            dict(bob, event="left"))}
        self.clock.advance(watch.REFRESH_SECONDS)
        self.assertIn("bob left since", view.presence()["meshKey"]["notice"])

    def test_member_not_told(self):
        """A plain member's page shows no notice and never asks for the key status."""
        view = self.ui.watch_for()
        client = self.clients[0]
        client.connect(role="member")
        self.clock.advance(watch.REFRESH_SECONDS)
        self.assertIsNone(view.presence()["meshKey"]["notice"])
        self.assertEqual([f for f in client.requests if f["type"] == "mesh_key_status"], [])

    def test_old_broker_keeps_the_hello_status(self):
        """A broker without mesh_key_status: the hello_ack's keyStatus stays on the page."""
        view = self.ui.watch_for()
        client = self.clients[0]
        client.replies["mesh_key_status"] = connection.RequestError("unknown_type", "no")
        client.connect()
        view._connected(dict(client.hello_ack, keyStatus=self.status(
            {"name": "eve", "pubkey": "e" * 64, "event": "left"})))
        self.clock.advance(0)
        self.assertIn("eve left since", view.presence()["meshKey"]["notice"])


class UIAgainstBrokerTests(unittest.TestCase):
    """
    A real watcher of the owner's against a real broker: ban from the page,
    the page's broadcast under the new epoch, and a joiner of its invite.
    """

    timeout = 60

    mktemp_dir = test_meshkeys_client.RotationAgainstBrokerTests.mktemp_dir
    client = test_meshkeys_client.RotationAgainstBrokerTests.client
    start = test_meshkeys_client.RotationAgainstBrokerTests.start
    stop_clients = test_meshkeys_client.RotationAgainstBrokerTests.stop_clients
    saved = test_meshkeys_client.RotationAgainstBrokerTests.saved
    member = test_meshkeys_client.RotationAgainstBrokerTests.member
    online = test_meshkeys_client.RotationAgainstBrokerTests.online
    make_store = test_meshkeys_client.RotationAgainstBrokerTests.make_store
    setUp = test_meshkeys_client.RotationAgainstBrokerTests.setUp

    @defer.inlineCallbacks
    def watcher(self):
        view = watch.MeshWatch(reactor, self.owner_entry, "ui-test",
                               session_identity=crypto.Identity.generate())
        view.start()
        self.addCleanup(view.stop)
        yield wait_until(lambda: view.state == "connected" and view.members)
        return view

    @defer.inlineCallbacks
    def test_page_bans_rotates_and_invites(self):
        """Ban from the page rotates; its broadcast and its invite are under the new epoch."""
        alice, alice_inbox = yield self.online(self.alice_entry)
        bob, _ = yield self.online(self.bob_entry)
        view = yield self.watcher()
        reply = yield view.moderate("ban", "bob")
        self.assertEqual(reply, {"banned": "bob",
                                 "rotated": {"epoch": 1, "members": ["alice", "owner"]}})
        yield wait_until(lambda: alice.mesh_keys.key_of(1) is not None)
        sent = yield view.send("*", "from the page")
        self.assertEqual(sent["targetSpec"], "*")
        received = yield alice_inbox.next()
        self.assertEqual((received.text, received.error), ("from the page", None))
        stored = yield self.broker.store.get_message(sent["messageId"])
        self.assertEqual(stored.key_epoch, 1)
        invite = yield view.invite()
        parsed = messages.parse_invite_link(invite["link"])
        self.assertEqual((parsed.mesh_key_epoch, parsed.key_checked), (1, True))
        # The QR code's compact form is the same invite.
        compact = messages.parse_invite_link(invite["compactLink"])
        self.assertEqual((compact.invite, compact.mesh_key, compact.mesh_key_epoch),
                         (parsed.invite, parsed.mesh_key, 1))
        carol_entry = self.saved("carol", (yield self.broker.join(invite["link"], "carol")))
        carol, carol_inbox = yield self.online(carol_entry)
        self.assertEqual(carol.hello_ack["keyEpoch"], 1)
        yield view.send("*", "hello carol")
        received = yield carol_inbox.next()
        self.assertEqual((received.text, received.error), ("hello carol", None))
        self.assertIsNone(view.presence()["meshKey"]["notice"])

    @defer.inlineCallbacks
    def test_page_told_of_a_ban_without_rotation(self):
        """After a ban without rotation the page's notice names it; rotate-key clears it."""
        view = yield self.watcher()
        self.assertEqual(view.presence()["meshKey"], {
            "epoch": 0, "held": True, "departedSinceRotation": [],
            "unbannedSinceRotation": [], "notice": None})
        reply = yield view.moderate("ban", "bob", rotate=False)
        self.assertEqual(reply, {"banned": "bob"})
        yield wait_until(lambda: view.presence()["meshKey"]["notice"])
        self.assertIn("bob was banned since the mesh key was last rotated",
                      view.presence()["meshKey"]["notice"])
        # Rotated elsewhere (the CLI's client): the page hears it and asks again.
        yield self.owner.mesh_keys.rotate("bob")
        yield wait_until(lambda: view.presence()["meshKey"]["notice"] is None)
        yield wait_until(lambda: view.presence()["meshKey"]["epoch"] == 1)
        self.assertTrue(view.presence()["meshKey"]["held"])
        # Epoch 1 was made while bob was banned: his unban makes epoch 2.
        reply = yield view.moderate("unban", "bob")
        self.assertEqual(reply["rotated"]["epoch"], 2)
        self.assertIn("bob", reply["rotated"]["members"])

    @defer.inlineCallbacks
    def test_page_opens_pushes_by_epoch(self):
        """The page's session opens a push by its epoch and says which epoch it never got."""
        view = yield self.watcher()
        yield self.owner.mesh_keys.rotate()
        yield wait_until(lambda: view.client.mesh_keys.key_of(1) is not None)
        key = view.client.mesh_keys.key_of(1)
        for message_id, epoch, sealing in (("m-1", 1, key), ("m-5", 5, crypto.new_mesh_key())):
            nonce, ciphertext = crypto.encrypt_broadcast(sealing, b"sealed under %d" % epoch)
            view.client._push({
                "type": "push", "messageId": message_id, "meshId": self.owner_entry.meshId,
                "senderPubkey": self.alice_entry.pubkey,
                "senderMemberPubkey": self.alice_entry.pubkey, "targetSpec": "*",
                "priority": "next", "nonce": nonce, "ciphertext": ciphertext,
                "createdAt": "2026-01-01T00:00:00.000Z", "seq": epoch, "keyEpoch": epoch})
        yield wait_until(lambda: "received:m-5" in view.messages)
        opened, missing = view.messages["received:m-1"], view.messages["received:m-5"]
        self.assertEqual((opened["text"], opened["error"]), ("sealed under 1", None))
        self.assertEqual((missing["text"], missing["error"]), (
            None, "cannot decrypt: sealed under key epoch 5, which this member never received"))
        self.assertEqual(opened["conversation"], "*")


class UIAgainstPostgresBrokerTests(UIAgainstBrokerTests):
    """
    The same, with the broker on Postgres.
    """

    skip = test_meshkeys_client.PG_SKIP
    make_store = test_meshkeys_client.RotationAgainstPostgresBrokerTests.make_store
