"""
The requests of a L{claudemesh.client.connection.MeshClient}: correlated
by C{_reqId} (a C{send} by its C{id}, kept across reconnects so a retried
send is stored once), queued (boundedly) while the client is disconnected,
timed out, and held to the largest frame the broker takes.
"""

import json
import uuid

from autobahn.exception import Disconnected
from twisted.internet import defer

from claudemesh import crypto
from claudemesh.client import meshkeys, messages
from claudemesh.client.errors import (
    ClientError,
    QueueFull,
    RequestError,
    Stopped,
    too_large,
)


def encode_frame(frame):
    """
    A frame as the client writes it: compact JSON, ASCII, so its length is
    what the broker counts.
    """
    return json.dumps(frame, separators=(",", ":")).encode("utf-8")


class Requests:
    """
    Mixed into L{claudemesh.client.connection.MeshClient}, whose connection
    state (C{connected}, C{_proto}, C{_pending}, C{_queue}, C{_finished},
    C{outcome}) it uses.
    """

    def request(self, frame, timeout=None):
        """
        Send a request; the L{Deferred} fires with the reply frame (matched by
        C{_reqId}) or fails with L{RequestError}.
        """
        frame = dict(frame)
        req_id = "r%d" % (next(self._req_ids),)
        frame["_reqId"] = req_id
        return self._submit(req_id, frame, timeout)

    def send(self, target_spec, nonce, ciphertext, priority="next", send_id=None,
             timeout=None, key_epoch=None):
        """
        Send an encrypted message; fires with the C{ack} frame (check its
        C{queued}). The C{id} stays the same across reconnects, so a retried
        send is stored once. C{key_epoch}: the mesh key epoch a broadcast is
        sealed under.
        """
        send_id = send_id or str(uuid.uuid4())
        frame = {"type": "send", "targetSpec": target_spec, "priority": priority,
                 "nonce": nonce, "ciphertext": ciphertext, "id": send_id}
        if key_epoch is not None:
            frame["keyEpoch"] = key_epoch
        return self._submit("send:" + send_id, frame, timeout)

    def send_text(self, target_spec, text, priority="next", send_id=None, timeout=None):
        """
        Encrypt C{text} for C{target_spec} and L{send} it. A broadcast is
        sealed under the mesh's current key epoch, and sealed again once
        should the key have been rotated meanwhile (issue 17).
        """
        plaintext = text.encode("utf-8")
        if messages.is_broadcast(target_spec):
            send_id = send_id or str(uuid.uuid4())

            @defer.inlineCallbacks
            def broadcast():
                for attempt in (1, 2):
                    try:
                        epoch, key = yield self.mesh_keys.sealing_key()
                    except meshkeys.NoKey as e:
                        raise ClientError(str(e)) from None
                    nonce, ciphertext = crypto.encrypt_broadcast(key, plaintext)
                    ack = yield self.send(target_spec, nonce, ciphertext, priority, send_id,
                                          timeout, key_epoch=epoch)
                    if (attempt == 1 and not ack.get("queued")
                            and (ack.get("error") or "").startswith("stale_key_epoch")
                            and self.mesh_keys.stale(ack)):
                        continue
                    return ack

            d = broadcast()
        else:
            nonce, ciphertext = messages.seal(target_spec, plaintext, self.sender_identity,
                                              None)
            d = self.send(target_spec, nonce, ciphertext, priority, send_id, timeout)
        if self.history is not None:
            def sent(ack):
                if ack.get("queued"):
                    self.history.note_sent(self, target_spec, text, priority, ack)
                return ack

            d.addCallback(sent)
        return d

    def fire(self, frame):
        """
        Send a frame that has no reply (C{set_status}, C{set_summary},
        C{join_group}, ...); queued while disconnected.
        """
        if self._finished:
            raise Stopped("the client is stopped")
        if self.connected and self._send_frame(frame):
            return
        if len(self._queue) + len(self._pending) >= self.max_queue:
            raise QueueFull("too many frames wait for the broker")
        self._queue.append(frame)

    def fire_checked(self, frame, timeout=None):
        """
        Send a frame that has no reply on success (C{set_status},
        C{set_summary}, ...) and learn whether it was refused: it carries a
        C{_reqId} (a refusal echoes it) and is followed by a C{list_peers};
        the broker handles frames in order, so a refusal of the first arrives
        before the answer to the second. Fires with the C{peers_list} that
        followed (what the change did is visible in it) or fails with
        L{RequestError}.
        """
        frame = dict(frame)
        req_id = "r%d" % (next(self._req_ids),)
        frame["_reqId"] = req_id
        errors = []
        self._submit(req_id, frame, None).addErrback(errors.append)
        probe = self.request({"type": "list_peers"}, timeout)

        def answered(peers):
            self._resolve(req_id, None)
            if errors:
                errors[0].raiseException()
            return peers

        def probe_failed(f):
            self._resolve(req_id, None)
            return f

        return probe.addCallbacks(answered, probe_failed)

    def _submit(self, key, frame, timeout):
        if self._finished:
            return self._outcome_result() if self.outcome else defer.fail(
                Stopped("the client is stopped"))
        if not self.connected and len(self._queue) + len(self._pending) >= self.max_queue:
            return defer.fail(QueueFull("too many frames wait for the broker"))
        d = defer.Deferred()
        call = None
        if timeout is not None:
            call = self._reactor.callLater(timeout, self._timed_out, key)
        entry = [frame, d, call, False]
        self._pending[key] = entry
        if self.connected:
            self._write(key, entry)
        return d

    def _write(self, key, entry):
        """
        Write a pending request, unless it is bigger than the broker takes:
        then it fails with L{MessageTooLarge} and is dropped.
        """
        payload = encode_frame(entry[0])
        limit = self.max_frame_bytes
        if limit is not None and len(payload) > limit:
            self._resolve(key, failure=too_large(entry[0], len(payload), limit))
            return
        entry[3] = len(payload)
        if not self._send_frame(entry[0]):
            # Closing: written again after the reconnect, as a request made
            # while not connected is.
            entry[3] = False

    def _send_frame(self, frame):
        """
        Write C{frame} on the connection. C{False} when nothing was written:
        it is already closing and its C{onClose} has not run yet, so the
        client still takes it for open.
        """
        try:
            self._proto.send_frame(frame)
        except Disconnected:
            return False
        return True

    def _timed_out(self, key):
        entry = self._pending.pop(key, None)
        if entry is not None:
            entry[2] = None
            entry[1].errback(RequestError(
                "timeout", "the broker did not answer in time", entry[0]))

    def _resolve(self, key, result=None, failure=None):
        entry = self._pending.pop(key, None)
        if entry is None:
            return False
        if entry[2] is not None and entry[2].active():
            entry[2].cancel()
        if failure is not None:
            entry[1].errback(failure)
        else:
            entry[1].callback(result)
        return True
