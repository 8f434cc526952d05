"""
Unit tests of the client's mesh key handling (issue 17), without a broker:
the sealed copies (L{claudemesh.crypto}), the key ring file, invite link
fragments, the config field, and L{EpochKeys} against a scripted client.
"""

import json
import os
import stat

from twisted.internet import defer
from twisted.trial import unittest

from claudemesh import crypto
from claudemesh.client import config as configuration
from claudemesh.client import keyring, meshkeys, messages
from claudemesh.client.connection import RequestError


class SealedCopyTests(unittest.TestCase):
    def setUp(self):
        self.admin = crypto.Identity.generate()
        self.member = crypto.Identity.generate()
        self.key = crypto.new_mesh_key()
        self.sealed = crypto.seal_mesh_key(self.admin, self.member.pubkey, "mesh1", 4, self.key)

    def test_round_trip(self):
        """The member opens its copy with the sealer's key; it is 88 bytes."""
        self.assertEqual(crypto.open_mesh_key(self.member, self.admin.pubkey, "mesh1", 4,
                                              self.sealed), self.key)
        self.assertEqual(len(crypto._unb64(self.sealed)), 88)

    def test_bound_to_mesh_epoch_and_keys(self):
        """A copy does not open for another epoch, mesh, sealer or member."""
        other = crypto.Identity.generate()
        for args in ((self.member, self.admin.pubkey, "mesh1", 3),
                     (self.member, self.admin.pubkey, "mesh2", 4),
                     (self.member, other.pubkey, "mesh1", 4),
                     (other, self.admin.pubkey, "mesh1", 4)):
            self.assertRaises(crypto.DecryptionFailed, crypto.open_mesh_key,
                              *(args + (self.sealed,)))
        self.assertRaises(crypto.DecryptionFailed, crypto.open_mesh_key, self.member,
                          self.admin.pubkey, "mesh1", 4, "not base64!")
        self.assertRaises(ValueError, crypto.seal_mesh_key, self.admin, self.member.pubkey,
                          "mesh1", 4, b"short")


class KeyRingTests(unittest.TestCase):
    def setUp(self):
        self.directory = self.mktemp()
        self.path = keyring.keyring_path(self.directory, "mesh1")

    def test_file_is_private_and_merged(self):
        """Keys go to a 0600 file in a 0700 directory; two writers keep each other's keys."""
        one = keyring.KeyRing("mesh1", {0: b"a" * 32}, self.path)
        two = keyring.KeyRing("mesh1", {}, self.path)
        one.put(1, b"b" * 32)
        two.put(2, b"c" * 32)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)
        again = keyring.KeyRing("mesh1", {0: b"a" * 32}, self.path)
        self.assertEqual(again.epochs(), [0, 1, 2])
        self.assertEqual((again.get(2), again.newest()), (b"c" * 32, 2))
        # The invite link's key stays in config.json only.
        with open(self.path) as f:
            self.assertEqual(sorted(json.load(f)["keys"]), ["1", "2"])

    def test_unreadable_file_left_alone(self):
        """A corrupt key ring is reported and never overwritten."""
        os.makedirs(os.path.dirname(self.path))
        for text in ("not json", '{"version": 2, "keys": {}}',
                     '{"version": 1, "keys": {"1": "short"}}'):
            with open(self.path, "w") as f:
                f.write(text)
            self.assertRaises(keyring.KeyRingError, keyring.KeyRing, "mesh1", {}, self.path)
            with open(self.path) as f:
                self.assertEqual(f.read(), text)

    def test_of_entry(self):
        """An entry's own key is that of its meshKeyEpoch; entries in memory keep no file."""
        identity = crypto.Identity.generate()
        key = crypto.new_mesh_key()
        entry = configuration.MeshEntry(
            "mesh1", "u1", "team", "team", identity.pubkey, identity.secret_hex, "ws://x/ws",
            "2026-01-01T00:00:00.000Z", crypto.encode_mesh_key(key), meshKeyEpoch=3)
        ring = keyring.KeyRing.of_entry(entry)
        self.assertEqual((ring.epochs(), ring.get(3), ring.path), ([3], key, None))
        configuration.save(self.directory, configuration.Config([entry]))
        loaded = configuration.load(self.directory).find("team")
        self.assertEqual((loaded.meshKeyEpoch, loaded.directory), (3, self.directory))
        self.assertEqual(keyring.KeyRing.of_entry(loaded).path, self.path)


class ConfigFieldTests(unittest.TestCase):
    def test_malformed_epoch_refused(self):
        """A meshKeyEpoch that is not a non-negative integer is a ConfigError."""
        identity = crypto.Identity.generate()
        obj = {"meshId": "m", "memberId": "u", "slug": "s", "name": "n",
               "pubkey": identity.pubkey, "secretKey": identity.secret_hex,
               "brokerUrl": "ws://x/ws", "joinedAt": "t"}
        for bad in (-1, "2", True, 1.5):
            self.assertRaises(configuration.ConfigError, configuration.MeshEntry.from_json,
                              dict(obj, meshKeyEpoch=bad), "config.json")
        self.assertNotIn("meshKeyEpoch",
                         configuration.MeshEntry.from_json(obj, "c").to_json())


class LinkFragmentTests(unittest.TestCase):
    def setUp(self):
        self.owner = crypto.Identity.generate()
        self.invite = messages.make_invite(self.owner, "mesh1", "team", "inv1", "member",
                                           1_900_000_000, "ws://x/ws")
        self.key = crypto.new_mesh_key()

    def test_epoch_after_the_key(self):
        """Epoch 0 is written bare; a later epoch as .N after the key; both read back."""
        bare = messages.invite_link(self.invite, self.key)
        self.assertEqual(bare.partition("#")[2], crypto.encode_mesh_key(self.key))
        self.assertEqual(messages.parse_invite_link(bare).mesh_key_epoch, 0)
        link = messages.invite_link(self.invite, self.key, 12)
        self.assertTrue(link.endswith(".12"))
        parsed = messages.parse_invite_link(link)
        self.assertEqual((parsed.mesh_key, parsed.mesh_key_epoch), (self.key, 12))

    def test_bad_epochs(self):
        """A fragment with a bad epoch is an InviteError."""
        base = messages.invite_link(self.invite, self.key)
        for suffix in (".", ".x", ".-1", ".1.2", ".9" * 20, ".٣"):
            self.assertRaises(messages.InviteError, messages.parse_invite_link, base + suffix)


def push(epoch, key, text, message_id):
    nonce, ciphertext = crypto.encrypt_broadcast(key, text.encode("utf-8"))
    frame = {"type": "push", "messageId": message_id, "targetSpec": "*", "nonce": nonce,
             "ciphertext": ciphertext, "senderPubkey": "s", "senderMemberPubkey": "s"}
    if epoch is not None:
        frame["keyEpoch"] = epoch
    return frame


class ScriptedClient:
    """
    What L{EpochKeys} uses of a L{MeshClient}: requests answered by the test.
    """

    def __init__(self, entry):
        self.mesh = entry
        self.hello_ack = {"role": "member"}
        self.requests = []
        # The members_list rows a list_members is answered with at once.
        self.members = []

    def request(self, frame, timeout=None):
        if frame["type"] == "list_members":
            return defer.succeed({"type": "members_list", "members": self.members})
        d = defer.Deferred()
        self.requests.append((frame, d))
        return d


class EpochKeysTests(unittest.TestCase):
    def setUp(self):
        self.admin = crypto.Identity.generate()
        self.me = crypto.Identity.generate()
        self.link_key = crypto.new_mesh_key()
        self.entry = configuration.MeshEntry(
            "mesh1", "u1", "team", "team", self.me.pubkey, self.me.secret_hex, "ws://x/ws",
            "2026-01-01T00:00:00.000Z", crypto.encode_mesh_key(self.link_key))
        self.client = ScriptedClient(self.entry)
        self.keys = meshkeys.EpochKeys(self.client, keyring.KeyRing.of_entry(self.entry))
        self.handed = []

    def hand(self, frame):
        opened = messages.open_push(frame, self.me, key_of_epoch=self.keys.key_of)
        self.handed.append((frame["messageId"], opened.text, opened.error))

    def answer_copy(self, index, epoch, key, sealer=None, sealed_by=None, roles=None):
        """
        Answer request C{index} (a C{get_mesh_key}) with a copy of C{key}
        sealed by C{sealer} (the admin) and naming C{sealed_by} (the
        sealer's key) as its sealer, the members listed with C{roles}
        (pubkey → role; the admin and this member).
        """
        sealer = sealer or self.admin
        if roles is None:
            roles = {self.admin.pubkey: "admin", self.me.pubkey: "member"}
        self.client.members = [{"name": "m%d" % (i,), "memberPubkey": pubkey, "role": role}
                               for i, (pubkey, role) in enumerate(roles.items())]
        frame, d = self.client.requests[index]
        self.assertEqual(frame, {"type": "get_mesh_key", "epoch": epoch})
        d.callback({"type": "mesh_key", "epoch": epoch,
                    "sealedBy": sealer.pubkey if sealed_by is None else sealed_by,
                    "sealedKey": crypto.seal_mesh_key(sealer, self.me.pubkey, "mesh1",
                                                      epoch, key)})

    def test_hello_fetches_the_current_key(self):
        """A hello_ack naming an epoch this member lacks asks for its copy, once."""
        self.keys.hello({"keyEpoch": 2})
        sealing = self.keys.sealing_key()
        self.assertEqual(len(self.client.requests), 1)
        key = crypto.new_mesh_key()
        self.answer_copy(0, 2, key)
        self.assertEqual(self.keys.key_of(2), key)
        self.assertEqual(self.successResultOf(sealing), (2, key))

    def assertRefused(self, epoch, sealing, words):
        """
        The copy of C{epoch} was not stored, and sealing under it fails
        with a NoKey naming the epoch and C{words}.
        """
        self.assertIsNone(self.keys.key_of(epoch))
        failure = self.failureResultOf(sealing, meshkeys.NoKey)
        self.assertIn("refused the mesh key of epoch %d" % (epoch,), str(failure.value))
        self.assertIn(words, str(failure.value))
        self.assertIn("the key was not stored", str(failure.value))
        self.assertEqual(self.keys.refused[epoch], str(failure.value))

    def test_copy_sealed_by_a_stranger_refused(self):
        """A copy the broker says a key of its own sealed (no member) is refused."""
        broker = crypto.Identity.generate()
        self.keys.hello({"keyEpoch": 2})
        sealing = self.keys.sealing_key()
        self.answer_copy(0, 2, crypto.new_mesh_key(), sealer=broker)
        self.assertRefused(2, sealing, "sealed by the key %s…, which is not an owner or"
                                       " admin of this mesh" % (broker.pubkey[:16],))
        # What the MCP server's mesh_info shows.
        self.assertTrue(self.keys.describe().startswith(
            "key epoch 2 (not held: broadcasts unreadable; refused the mesh key of epoch 2:"),
            self.keys.describe())
        # Not asked again on this connection, and pushes of that epoch say so.
        self.keys.admit(push(2, crypto.new_mesh_key(), "x", "m1"), self.hand)
        self.assertEqual(len(self.client.requests), 1)
        self.assertEqual(self.handed, [("m1", None, "cannot decrypt: sealed under key epoch 2,"
                                                    " which this member never received")])

    def test_copy_sealed_by_a_plain_member_refused(self):
        """A copy sealed by a member who is neither owner nor admin is refused."""
        self.keys.hello({"keyEpoch": 1})
        sealing = self.keys.sealing_key()
        self.answer_copy(0, 1, crypto.new_mesh_key(),
                         roles={self.admin.pubkey: "member", self.me.pubkey: "member"})
        self.assertRefused(1, sealing, "not an owner or admin")

    def test_copy_naming_an_admin_it_was_not_sealed_by_refused(self):
        """A copy sealed by another key but naming the admin as sealer does not open."""
        self.keys.hello({"keyEpoch": 1})
        sealing = self.keys.sealing_key()
        self.answer_copy(0, 1, crypto.new_mesh_key(), sealer=crypto.Identity.generate(),
                         sealed_by=self.admin.pubkey)
        self.assertRefused(1, sealing, "does not open as this mesh's key of that epoch")

    def test_malformed_sealer_shown_as_no_key(self):
        """A sealedBy that is no key (escapes, a number) is not echoed."""
        self.keys.hello({"keyEpoch": 1})
        sealing = self.keys.sealing_key()
        self.answer_copy(0, 1, crypto.new_mesh_key(), sealed_by="\x1b[2J")
        self.assertRefused(1, sealing, "sealed by no member key")

    def test_owner_sealer_accepted(self):
        """A copy sealed by the mesh's owner is taken."""
        key = crypto.new_mesh_key()
        self.keys.hello({"keyEpoch": 1})
        self.answer_copy(0, 1, key, roles={self.admin.pubkey: "owner"})
        self.assertEqual(self.keys.key_of(1), key)
        self.assertEqual(self.keys.refused, {})

    def test_pushes_wait_in_order(self):
        """A push whose key is being fetched holds the pushes after it, in order."""
        key = crypto.new_mesh_key()
        self.keys.admit(push(1, key, "first", "m1"), self.hand)
        self.keys.admit(push(None, self.link_key, "second", "m2"), self.hand)
        self.assertEqual(self.handed, [])
        self.answer_copy(0, 1, key)
        self.assertEqual(self.handed, [("m1", "first", None), ("m2", "second", None)])

    def test_missing_epoch_asked_once(self):
        """An epoch without a copy is asked for once; later pushes say so at once."""
        self.keys.admit(push(3, crypto.new_mesh_key(), "a", "m1"), self.hand)
        self.client.requests[0][1].errback(RequestError("no_sealed_key", "none"))
        self.keys.admit(push(3, crypto.new_mesh_key(), "b", "m2"), self.hand)
        self.assertEqual(len(self.client.requests), 1)
        never = "cannot decrypt: sealed under key epoch 3, which this member never received"
        self.assertEqual(self.handed, [("m1", None, never), ("m2", None, never)])
        # A copy shared later is fetched when the broker says so.
        self.keys.event({"event": "mesh_key_shared", "eventData": {"epoch": 3}})
        self.assertEqual(self.client.requests[1][0]["epoch"], 3)

    def test_stale_ack_moves_the_epoch(self):
        """A stale_key_epoch ack moves the current epoch forward, never back."""
        self.keys.hello({"keyEpoch": 2})
        self.assertTrue(self.keys.stale({"currentEpoch": 3}))
        self.assertEqual(self.keys.current, 3)
        self.assertFalse(self.keys.stale({"currentEpoch": 1}))
        self.assertFalse(self.keys.stale({"currentEpoch": "4"}))
        self.assertEqual(self.keys.current, 3)

    def test_no_key_to_seal_with(self):
        """Without the current epoch's key, sealing fails with NoKey naming the epoch."""
        self.keys.hello({"keyEpoch": 4})
        self.client.requests[0][1].errback(RequestError("no_sealed_key", "none"))
        failure = self.failureResultOf(self.keys.sealing_key(), meshkeys.NoKey)
        self.assertIn("current key epoch 4", str(failure.value))
        self.assertRaises(meshkeys.NoKey, self.keys.invite_key)

    def test_banned_when_made_says_so(self):
        """No copy because this member was banned when the epoch was made: NoKey says that."""
        self.keys.hello({"keyEpoch": 1})
        self.client.requests[0][1].errback(RequestError(
            "no_sealed_key", "key epoch 1 was made while this member was banned",
            {"bannedWhenMade": True}))
        failure = self.failureResultOf(self.keys.sealing_key(), meshkeys.NoKey)
        self.assertEqual(str(failure.value), "this member was banned when the mesh key of"
                         " epoch 1 was made, so that key is never shared with it: the next"
                         " rotation by an owner or admin seals a fresh key for it")

    def test_old_broker(self):
        """A hello_ack without keyEpoch (an older broker) means epoch 0 and no request."""
        self.keys.hello({})
        self.assertEqual((self.keys.current, self.client.requests), (0, []))
        self.assertEqual(self.successResultOf(self.keys.sealing_key()), (0, self.link_key))

    def test_moderator_shares_with_keyless_members(self):
        """An admin's client seals the current key for members listed without one."""
        self.client.hello_ack = {"role": "admin"}
        key = crypto.new_mesh_key()
        self.keys.ring.put(1, key)
        carol = crypto.Identity.generate()
        self.keys.hello({"keyEpoch": 1, "role": "admin", "keyStatus": {
            "withoutKey": [{"name": "carol", "memberPubkey": carol.pubkey},
                           {"name": "me", "memberPubkey": self.me.pubkey}]}})
        [(frame, d)] = self.client.requests
        self.assertEqual((frame["type"], frame["epoch"]), ("share_mesh_key", 1))
        [entry] = frame["sealedKeys"]
        self.assertEqual(crypto.open_mesh_key(carol, self.me.pubkey, "mesh1", 1,
                                              entry["sealedKey"]), key)
        d.callback({"type": "share_mesh_key_ack", "epoch": 1, "shared": 1})
        self.assertEqual(self.keys.notices(), [
            "sealed the mesh key (epoch 1) for carol, who joined after it was rotated"])

    def test_departure_notice(self):
        """Departures since the last rotation make one sentence naming them."""
        self.keys.status = {"departedSinceRotation": [
            {"name": "bob", "event": "banned"}, {"name": None, "pubkey": "ab" * 32,
                                                 "event": "left"}], "departedTotal": 9}
        [line] = self.keys.notices()
        self.assertEqual(line, "bob was banned, abababab left (and 7 more) since the mesh key"
                               " was last rotated: they can still read broadcasts sealed with"
                               " it. Run 'claudemesh rotate-key'.")
        self.keys.rotated = 1
        self.assertEqual(self.keys.notices(), [])

    def test_unbanned_member_notice(self):
        """Members banned when the current key was made and unbanned since: rotate, not share."""
        self.client.hello_ack = {"role": "owner"}
        bob = {"name": "bob", "memberPubkey": "b" * 64}
        self.keys.ring.put(1, crypto.new_mesh_key())
        self.keys.hello({"keyEpoch": 1, "role": "owner", "keyStatus": {
            "withoutKey": [], "unbannedSinceRotation": [bob, {"name": "x", "memberPubkey": 1}]}})
        self.assertEqual(self.keys.unbanned(), [bob])
        line = ("bob was unbanned after the mesh key (epoch 1) was made without them: that key"
                " is never shared with them (it sealed what was broadcast during the ban), so"
                " they cannot read broadcasts until the key is rotated. Run 'claudemesh"
                " rotate-key'.")
        self.assertEqual(self.keys.notices(), [line])
        self.assertEqual(self.keys.describe(), "key epoch 1 (held); " + line)
        # Nothing was shared with bob.
        self.assertEqual([f["type"] for f, _ in self.client.requests], [])
        self.keys.rotated = 2
        self.assertEqual(self.keys.notices(), [])
