"""
Mesh key rotation end to end (issue 17): real L{MeshClient}s against a real
broker on 127.0.0.1, on the SQLite store and on Postgres. Members are made
through the broker's own routes and kept in config directories, so their key
rings are the files a user's would be.
"""

import os
import stat

import nacl.exceptions
import nacl.secret
from twisted.internet import defer, reactor
from twisted.trial import unittest

from claudemesh import crypto
from claudemesh.client import config as configuration
from claudemesh.client import keyring, messages
from claudemesh.client.connection import ClientError
from claudemesh.store.postgres import PostgresStore
from tests import pg, test_client_broker
from tests.test_client_broker import wait_until

PG_DSN, PG_SKIP = pg.postgres_dsn_or_skip_reason()


class RotationAgainstBrokerTests(unittest.TestCase):
    """
    Rotation, removed and offline members, stale epochs and late joiners,
    with the client library.
    """

    timeout = 60

    # The broker, clients and their inboxes of the client library's tests.
    mktemp_dir = test_client_broker.ClientAgainstBrokerTests.mktemp_dir
    client = test_client_broker.ClientAgainstBrokerTests.client
    start = test_client_broker.ClientAgainstBrokerTests.start
    stop_clients = test_client_broker.ClientAgainstBrokerTests.stop_clients

    def make_store(self):
        return None

    @defer.inlineCallbacks
    def setUp(self):
        from tests.clientfixture import InProcessBroker

        self.clients = []
        self.home = self.mktemp_dir()
        self.broker = InProcessBroker(reactor, self.mktemp_dir(), self.make_store())
        yield self.broker.start()
        self.addCleanup(self.broker.stop)
        self.addCleanup(self.stop_clients)
        self.owner_entry = self.saved("owner", (yield self.broker.new_mesh("team", "owner")))
        self.owner, self.owner_inbox = self.client(self.owner_entry)
        yield self.start(self.owner)
        self.alice_entry = yield self.member("alice")
        self.bob_entry = yield self.member("bob")

    def saved(self, who, entry):
        """
        C{entry} written to C{who}'s config directory and read back, as a
        command would read it.
        """
        directory = os.path.join(self.home, who)
        config = configuration.load(directory)
        config.put(entry)
        configuration.save(directory, config)
        return configuration.load(directory).find(entry.slug)

    @defer.inlineCallbacks
    def member(self, who):
        link = yield self.broker.invite(self.owner)
        entry = yield self.broker.join(link, who)
        return self.saved(who, entry)

    @defer.inlineCallbacks
    def online(self, entry):
        c, inbox = self.client(entry)
        yield self.start(c)
        return c, inbox

    def stored_ciphertext(self, message_id):
        """
        A message as a copy of the broker's database holds it.
        """
        d = self.broker.store.get_message(message_id)
        return d.addCallback(lambda m: (crypto._unb64(m.nonce), crypto._unb64(m.ciphertext)))

    @defer.inlineCallbacks
    def test_banned_member_cannot_read_after_the_ban(self):
        """A banned member's client, holding every key it had, cannot open what follows."""
        alice, alice_inbox = yield self.online(self.alice_entry)
        bob, bob_inbox = yield self.online(self.bob_entry)
        epoch, names = yield self.owner.mesh_keys.rotate("routine")
        self.assertEqual((epoch, sorted(names)), (1, ["alice", "bob", "owner"]))
        yield wait_until(lambda: bob.mesh_keys.key_of(1) is not None)
        ack = yield self.owner.send_text("*", "before the ban")
        self.assertEqual((yield bob_inbox.next()).text, "before the ban")
        # Everything bob ever held: his invite link's key and epoch 1's.
        bob_keys = [keyring.KeyRing.of_entry(self.bob_entry).get(e) for e in (0, 1)]
        self.assertNotIn(None, bob_keys)
        yield self.owner.request({"type": "ban", "target": "bob"})
        yield bob.when_done().addErrback(lambda f: None)
        epoch, names = yield self.owner.mesh_keys.rotate("ban of bob")
        self.assertEqual((epoch, sorted(names)), (2, ["alice", "owner"]))
        ack = yield self.owner.send_text("*", "after the ban")
        self.assertTrue(ack["queued"], ack)
        self.assertEqual((yield alice_inbox.next()).text, "before the ban")
        received = yield alice_inbox.next()
        self.assertEqual((received.text, received.error), ("after the ban", None))
        nonce, ciphertext = yield self.stored_ciphertext(ack["messageId"])
        for key in bob_keys:
            self.assertRaises(nacl.exceptions.CryptoError,
                              nacl.secret.SecretBox(key).decrypt, ciphertext, nonce)
        self.assertEqual(nacl.secret.SecretBox(alice.mesh_keys.key_of(2)).decrypt(
            ciphertext, nonce), b"after the ban")

    @defer.inlineCallbacks
    def test_offline_member_reads_next_broadcast(self):
        """A member offline during the rotation fetches the key at hello and reads on."""
        alice, alice_inbox = yield self.online(self.alice_entry)
        yield self.owner.mesh_keys.rotate()
        bob, bob_inbox = yield self.online(self.bob_entry)
        self.assertEqual(bob.hello_ack["keyEpoch"], 1)
        yield bob.mesh_keys.settled()
        yield self.owner.send_text("*", "welcome back")
        inbound = yield bob_inbox.next()
        self.assertEqual((inbound.text, inbound.error), ("welcome back", None))
        path = keyring.keyring_path(self.bob_entry.directory, self.bob_entry.meshId)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        self.assertEqual(keyring.KeyRing.of_entry(self.bob_entry).epochs(), [0, 1])

    @defer.inlineCallbacks
    def test_stale_sender_seals_again(self):
        """A client that missed the rotation is refused stale_key_epoch once, then sends."""
        # A one-shot session hears no events: it still believes in epoch 0.
        alice, _ = self.client(self.alice_entry, receive=False)
        yield self.start(alice)
        bob, bob_inbox = yield self.online(self.bob_entry)
        yield self.owner.mesh_keys.rotate()
        nonce, ciphertext = crypto.encrypt_broadcast(self.alice_entry.mesh_key, b"old key")
        ack = yield alice.send("*", nonce, ciphertext, key_epoch=0)
        self.assertEqual((ack["queued"], ack["currentEpoch"]), (False, 1))
        self.assertTrue(ack["error"].startswith("stale_key_epoch"), ack)
        self.assertEqual(alice.mesh_keys.current, 0)
        ack = yield alice.send_text("*", "sealed again")
        self.assertTrue(ack["queued"], ack)
        self.assertEqual(alice.mesh_keys.current, 1)
        inbound = yield bob_inbox.next()
        self.assertEqual((inbound.text, inbound.error), ("sealed again", None))

    @defer.inlineCallbacks
    def test_late_joiner_gets_a_copy(self):
        """A member joining with an invite made before the rotation is sealed a copy."""
        old_link = yield self.broker.invite(self.owner)
        yield self.owner.mesh_keys.rotate()
        carol_entry = self.saved("carol", (yield self.broker.join(old_link, "carol")))
        self.assertEqual(carol_entry.meshKeyEpoch, 0)
        carol, carol_inbox = yield self.online(carol_entry)
        # The owner's live client hears mesh_key_wanted and shares.
        yield wait_until(lambda: carol.mesh_keys.key_of(1) is not None)
        self.assertEqual(self.owner.mesh_keys.shared, [("carol", 1)])
        yield self.owner.send_text("*", "hi carol")
        self.assertEqual((yield carol_inbox.next()).text, "hi carol")
        new_link = yield self.broker.invite(self.owner)
        self.assertTrue(new_link.endswith(".1"), new_link)
        parsed = messages.parse_invite_link(new_link)
        self.assertEqual((parsed.mesh_key, parsed.mesh_key_epoch),
                         (self.owner.mesh_keys.key_of(1), 1))

    @defer.inlineCallbacks
    def test_never_received_said_clearly(self):
        """A push sealed under an epoch this member cannot get says so, once asked."""
        bob, bob_inbox = yield self.online(self.bob_entry)
        key = crypto.new_mesh_key()
        nonce, ciphertext = crypto.encrypt_broadcast(key, b"x")
        frame = {"type": "push", "messageId": "m-3", "meshId": self.bob_entry.meshId,
                 "senderPubkey": self.owner_entry.pubkey,
                 "senderMemberPubkey": self.owner_entry.pubkey, "targetSpec": "*",
                 "priority": "next", "nonce": nonce, "ciphertext": ciphertext,
                 "createdAt": "2026-01-01T00:00:00.000Z", "seq": 1, "keyEpoch": 3}
        bob._push(frame)
        inbound = yield bob_inbox.next()
        self.assertEqual(inbound.error,
                         "cannot decrypt: sealed under key epoch 3, which this member never"
                         " received")
        self.assertIn(3, bob.mesh_keys._asked)

    @defer.inlineCallbacks
    def test_mcp_server_opens_by_epoch(self):
        """The MCP bridge's notifications open rotated broadcasts and say what they cannot."""
        from claudemesh.mcpserver import bridge

        notified = []
        link = bridge.Bridge(reactor, [self.bob_entry], "mcp-bob",
                             lambda content, meta: notified.append(content))
        link.start()
        self.addCleanup(link.stop)
        client = link.links[0].client
        yield client.when_ready()
        yield self.owner.mesh_keys.rotate()
        yield self.owner.send_text("*", "rotated hello")
        yield wait_until(lambda: any("rotated hello" in text for text in notified))
        nonce, ciphertext = crypto.encrypt_broadcast(crypto.new_mesh_key(), b"x")
        client._push({"type": "push", "messageId": "m-9", "meshId": self.bob_entry.meshId,
                      "senderPubkey": self.owner_entry.pubkey,
                      "senderMemberPubkey": self.owner_entry.pubkey, "targetSpec": "*",
                      "priority": "next", "nonce": nonce, "ciphertext": ciphertext,
                      "createdAt": "2026-01-01T00:00:00.000Z", "seq": 9, "keyEpoch": 5})
        yield wait_until(lambda: any("epoch 5" in text for text in notified))
        self.assertIn("[could not decrypt this message: cannot decrypt: sealed under key"
                      " epoch 5, which this member never received]", notified[-1])

    @defer.inlineCallbacks
    def test_rejoiner_gets_the_current_epoch(self):
        """A member who left, rejoining after the rotation, is at the current epoch and reads."""
        from claudemesh.client import membership

        alice, _ = yield self.online(self.alice_entry)
        yield alice.request({"type": "leave"})
        yield alice.when_done().addErrback(lambda f: None)
        yield self.owner.mesh_keys.refresh_status()
        self.assertEqual([d["name"] for d in
                          self.owner.mesh_keys.status["departedSinceRotation"]], ["alice"])
        yield self.owner.mesh_keys.rotate("alice left")
        yield self.owner.mesh_keys.refresh_status()
        self.assertEqual(self.owner.mesh_keys.status["departedSinceRotation"], [])
        link = yield self.broker.invite(self.owner)
        parsed = messages.parse_invite_link(link)
        entry = yield membership.join_mesh(reactor, parsed, "alice",
                                           self.alice_entry.identity)
        entry = self.saved("alice", entry)
        self.assertEqual(entry.meshKeyEpoch, 1)
        again, inbox = yield self.online(entry)
        self.assertEqual(again.hello_ack["keyEpoch"], 1)
        yield self.owner.send_text("*", "welcome back alice")
        received = yield inbox.next()
        self.assertEqual((received.text, received.error), ("welcome back alice", None))

    @defer.inlineCallbacks
    def test_member_cannot_rotate(self):
        """A plain member's rotation is refused forbidden and nothing changes."""
        alice, _ = yield self.online(self.alice_entry)
        error = yield self.assertFailure(alice.mesh_keys.rotate(), ClientError)
        self.assertEqual(error.code, "forbidden")
        self.assertEqual((yield self.broker.store.current_key_epoch(
            self.owner_entry.meshId)), 0)

    @defer.inlineCallbacks
    def test_rotation_in_parts(self):
        """A rotation larger than a frame goes in parts and commits once."""
        self.owner.mesh_keys.frame_bytes = 1200
        carol = yield self.member("carol")
        dave = yield self.member("dave")
        epoch, names = yield self.owner.mesh_keys.rotate()
        self.assertEqual(len(names), 5)
        for entry in (carol, dave, self.alice_entry):
            c, _ = yield self.online(entry)
            yield c.mesh_keys.settled()
            self.assertEqual(c.mesh_keys.key_of(1), self.owner.mesh_keys.key_of(1))


class RotationAgainstPostgresBrokerTests(RotationAgainstBrokerTests):
    """
    The same, with the broker on Postgres.
    """

    skip = PG_SKIP

    def make_store(self):
        schema = pg.new_schema()
        self.addCleanup(pg.drop_schema, PG_DSN, schema)
        return lambda: PostgresStore(PG_DSN, schema, reactor)
