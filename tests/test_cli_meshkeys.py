"""
C{claudemesh rotate-key} and C{claudemesh ban} rotating the mesh key
(issue 17), as subprocesses against a real broker (C{twistd -n
claudemesh-broker}) with one config directory per identity.
"""

import json
import os
import time

from twisted.trial.unittest import SynchronousTestCase

from claudemesh.client import config as configuration
from claudemesh.client import keyring
from tests import test_cli_commands


class KeyRotationCLITests(SynchronousTestCase):
    """
    rotate-key, ban (with and without --no-rotate), the notice after an
    owner's commands, doctor, and invites after a rotation.
    """

    # The broker and the helpers of the CLI's own subprocess tests.
    start_broker = test_cli_commands.CLIAgainstBrokerTests.start_broker
    stop_broker = test_cli_commands.CLIAgainstBrokerTests.stop_broker
    env = test_cli_commands.CLIAgainstBrokerTests.env
    setUp = test_cli_commands.CLIAgainstBrokerTests.setUp
    stop_listeners = test_cli_commands.CLIAgainstBrokerTests.stop_listeners
    cm = test_cli_commands.CLIAgainstBrokerTests.cm
    ok = test_cli_commands.CLIAgainstBrokerTests.ok
    mesh_with = test_cli_commands.CLIAgainstBrokerTests.mesh_with
    listen = test_cli_commands.CLIAgainstBrokerTests.listen

    def keys_of(self, who):
        """
        The epochs whose key C{who}'s config directory holds.
        """
        directory = os.path.join(self.dir, who)
        [entry] = configuration.load(directory).meshes
        return keyring.KeyRing.of_entry(entry).epochs()

    def received(self, listener, text, timeout=15):
        """
        Read C{listener}'s JSON lines until a message with C{text}.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = listener.stdout.readline()
            if not line:
                break
            document = json.loads(line)
            if document.get("text") == text or document.get("error"):
                return document
        raise AssertionError("no message %r" % (text,))

    def test_ban_rotates_by_default(self):
        """ban rotates the key; the others read what follows, the banned never gets it."""
        self.mesh_with("alice", "bob")
        alice = self.listen("alice")
        code, out, err = self.cm("owner", "ban", "bob")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "Banned bob. They can no longer connect or rejoin until unbanned.\n"
                              "Rotated the mesh key to epoch 1, sealed for 2 members: alice,"
                              " owner.\n")
        self.assertNotIn("rotate-key", err)
        self.ok("owner", "send", "*", "after the ban")
        document = self.received(alice, "after the ban")
        self.assertIsNone(document["error"])
        self.assertEqual(self.keys_of("bob"), [0])
        self.assertEqual(self.keys_of("owner"), [0, 1])
        entries = json.loads(self.ok("owner", "audit", "--json"))
        [rotated] = [e for e in entries if e["eventType"] == "mesh_key_rotated"]
        self.assertEqual(rotated["payload"], {"epoch": 1, "by": "owner",
                                              "reason": "ban of bob"})

    def test_ban_without_rotation_is_pointed_out(self):
        """ban --no-rotate keeps the key; owner commands and doctor say so until rotate-key."""
        self.mesh_with("alice", "bob")
        code, out, err = self.cm("owner", "ban", "bob", "--no-rotate")
        self.assertEqual((code, "Rotated" in out), (0, False))
        # Said by the ban itself, not only from the next command on.
        self.assertIn("claudemesh: bob was banned since the mesh key was last rotated", err)
        code, out, err = self.cm("owner", "peers")
        self.assertEqual(code, 0)
        self.assertIn("claudemesh: bob was banned since the mesh key was last rotated: they can"
                      " still read broadcasts sealed with it. Run 'claudemesh rotate-key'.", err)
        code, _, err = self.cm("alice", "peers")
        self.assertNotIn("rotate-key", err)
        code, out, _ = self.cm("owner", "doctor", "--json")
        checks = {c["check"]: c for c in json.loads(out)["checks"]}
        [check] = [c for text, c in checks.items() if "bob was banned" in text]
        self.assertEqual((check["ok"], check["fix"]),
                         (False, "claudemesh rotate-key --mesh %s" % (self.mesh,)))
        document = json.loads(self.ok("owner", "rotate-key", "--reason", "bob", "--json"))
        self.assertEqual(document, {"epoch": 1, "members": ["alice", "owner"]})
        code, out, err = self.cm("owner", "peers")
        self.assertNotIn("rotate-key", err)
        code, out, _ = self.cm("owner", "doctor", "--json")
        self.assertTrue(any(c["ok"] and "no member left" in c["check"]
                            for c in json.loads(out)["checks"]), out)

    def test_unban_drops_the_departure_notice(self):
        """
        unban after ban --no-rotate says nothing about rotating: the notice
        is read again after the unban, which the broker leaves out.
        """
        self.mesh_with("alice", "bob")
        self.ok("owner", "ban", "bob", "--no-rotate")
        code, out, err = self.cm("owner", "unban", "bob")
        self.assertEqual((code, out), (0, "Unbanned bob.\n"))
        self.assertNotIn("rotate-key", err)

    def test_unban_after_a_rotating_ban_rotates_again(self):
        """
        ban (epoch 1 without bob), unban: epoch 1 is never shared with bob;
        the unban rotates to epoch 2 for everyone, bob included.
        """
        self.mesh_with("alice", "bob")
        self.ok("owner", "ban", "bob")
        code, out, err = self.cm("owner", "unban", "bob")
        self.assertEqual((code, out), (0, "Unbanned bob.\nRotated the mesh key to epoch 2,"
                                          " sealed for 3 members: alice, bob, owner.\n"), err)
        self.assertNotIn("sealed the mesh key (epoch 1) for bob", err)
        self.ok("bob", "peers")
        self.assertEqual(self.keys_of("bob"), [0, 2])
        bob = self.listen("bob")
        self.ok("alice", "send", "*", "welcome back")
        self.assertIsNone(self.received(bob, "welcome back")["error"])

    def test_unbanned_member_never_gets_the_epoch_of_the_ban(self):
        """
        ban, unban --no-rotate, rotate-key (review 2, N3): epoch 1 is not
        sealed for bob (the broker refuses it too); the notice says why and
        the rotation makes epoch 2, which bob gets.
        """
        self.mesh_with("alice", "bob")
        self.ok("owner", "ban", "bob")
        code, out, err = self.cm("owner", "unban", "bob", "--no-rotate")
        self.assertEqual((code, out), (0, "Unbanned bob.\n"), err)
        self.assertIn("claudemesh: bob was unbanned after the mesh key (epoch 1) was made"
                      " without them: that key is never shared with them (it sealed what was"
                      " broadcast during the ban), so they cannot read broadcasts until the"
                      " key is rotated. Run 'claudemesh rotate-key'.", err)
        # bob asks for epoch 1: refused, and no owner's client is asked.
        code, out, err = self.cm("bob", "send", "*", "hi")
        self.assertNotEqual(code, 0)
        self.assertIn("claudemesh: this member was banned when the mesh key of epoch 1 was"
                      " made, so that key is never shared with it: the next rotation by an"
                      " owner or admin seals a fresh key for it", err)
        code, out, err = self.cm("owner", "peers")
        self.assertNotIn("sealed the mesh key", err)
        self.assertEqual(self.keys_of("bob"), [0])
        # doctor says the same, for bob and for the owner.
        for who, words in (("bob", "missing (broadcasts unreadable); this member was banned"
                                   " when the mesh key of epoch 1 was made"),
                           ("owner", "bob was unbanned after the mesh key (epoch 1) was made")):
            code, out, err = self.cm(who, "doctor", "--json")
            self.assertNotEqual(code, 0)
            self.assertTrue(any(not c["ok"] and words in c["check"]
                                for c in json.loads(out)["checks"]), out)
        code, out, err = self.cm("owner", "rotate-key")
        self.assertEqual((code, out), (0, "Rotated the mesh key to epoch 2, sealed for 3"
                                          " members: alice, bob, owner.\n"), err)
        self.assertNotIn("epoch 1", err)
        self.ok("bob", "peers")
        self.assertEqual(self.keys_of("bob"), [0, 2])

    def test_rotate_key_needs_a_moderator(self):
        """A member's rotate-key is forbidden, exit 7."""
        self.mesh_with("alice")
        code, out, err = self.cm("alice", "rotate-key")
        self.assertEqual(code, 7, (out, err))
        self.assertIn("forbidden: only owner or admin can rotate the mesh key", err)

    def test_invite_after_rotation(self):
        """An invite made after a rotation carries the epoch; its joiner reads broadcasts."""
        self.mesh_with("alice")
        self.ok("owner", "rotate-key")
        link = json.loads(self.ok("owner", "invite", "--json"))["link"]
        self.assertTrue(link.endswith(".1"), link)
        self.ok("carol", "join", link, "--name", "carol")
        self.assertEqual(self.keys_of("carol"), [1])
        carol = self.listen("carol")
        self.ok("alice", "send", "*", "hello carol")
        self.assertIsNone(self.received(carol, "hello carol")["error"])

    def test_member_who_joined_before_rotation_is_sealed_a_copy(self):
        """A member with an old invite gets a copy at the owner's next command."""
        self.ok("owner", "new", self.mesh, "--name", "owner")
        old = json.loads(self.ok("owner", "invite", "--json"))["link"]
        self.ok("owner", "rotate-key")
        self.ok("dave", "join", old, "--name", "dave")
        # dave asks; no moderator is online to answer.
        self.ok("dave", "peers")
        code, out, err = self.cm("owner", "peers")
        self.assertIn("claudemesh: sealed the mesh key (epoch 1) for dave, who joined after it"
                      " was rotated", err)
        self.ok("dave", "peers")
        self.assertEqual(self.keys_of("dave"), [0, 1])

    def test_rejoin_keeps_the_old_key(self):
        """A member re-joining with a link made after a rotation keeps its earlier key too."""
        self.mesh_with("alice")
        self.ok("owner", "rotate-key")
        link = json.loads(self.ok("owner", "invite", "--json"))["link"]
        document = json.loads(self.ok("alice", "join", link, "--json"))
        self.assertTrue(document["alreadyMember"])
        directory = os.path.join(self.dir, "alice")
        [entry] = configuration.load(directory).meshes
        self.assertEqual(entry.meshKeyEpoch, 1)
        self.assertEqual(self.keys_of("alice"), [0, 1])
        alice = self.listen("alice")
        self.ok("owner", "send", "*", "after the rejoin")
        self.assertIsNone(self.received(alice, "after the rejoin")["error"])

    def test_listen_says_key_events(self):
        """A listener says who rotated; an owner's listener names departures as it starts."""
        import subprocess

        self.mesh_with("alice", "bob")
        self.ok("owner", "ban", "bob", "--no-rotate")
        owner = subprocess.Popen(test_cli_commands.claudemesh_command() + ["listen"],
                                 env=self.env("owner"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        self.listeners.append(owner)
        alice = subprocess.Popen(test_cli_commands.claudemesh_command() + ["listen"],
                                 env=self.env("alice"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        self.listeners.append(alice)
        self.assertIn("Listening on", owner.stderr.readline())
        self.assertIn("claudemesh: bob was banned since the mesh key was last rotated",
                      owner.stderr.readline())
        self.assertIn("Listening on", alice.stderr.readline())
        self.ok("owner", "rotate-key")
        deadline = time.time() + 15
        while time.time() < deadline:
            line = alice.stdout.readline()
            if "rotated" in line or not line:
                break
        self.assertEqual(line, "* owner rotated the mesh key (epoch 1)\n")
