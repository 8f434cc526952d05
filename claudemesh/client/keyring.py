"""
The client's key ring (issue 17): every key epoch's key of one mesh this
member holds, so what was sealed under an old epoch stays readable.

The key ring is C{<config dir>/keys/<meshId>.json} (0600, in a 0700
directory): C{{version: 1, meshId, keys: {"<epoch>": "<base64url key>"}}},
rewritten atomically under an exclusive lock, so a long-lived client adding
a key never races a command rewriting C{config.json}. The epoch of the key
in C{config.json} (C{meshKey}, from the invite link or C{claudemesh new}) is
C{meshKeyEpoch}.
"""

import json
import os

from claudemesh import crypto
from claudemesh.client import config as configuration
from claudemesh.client.history import FileLock, mesh_file_name

KEYS_DIR = "keys"
KEYRING_VERSION = 1


class KeyRingError(configuration.ConfigError):
    """
    The key ring file cannot be read; it is left as it is.
    """


def keyring_path(directory, mesh_id):
    return os.path.join(directory, KEYS_DIR, mesh_file_name(mesh_id) + ".json")


def _read(path):
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise KeyRingError("the key ring %s is unreadable (%s); it was left as it is."
                           % (path, e)) from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if document.get("version") != KEYRING_VERSION or not isinstance(keys, dict):
        raise KeyRingError("%s is not a claudemesh key ring; it was left as it is." % (path,))
    found = {}
    for epoch, text in keys.items():
        try:
            found[int(epoch)] = crypto.decode_mesh_key(text)
        except (ValueError, TypeError, AttributeError):
            raise KeyRingError("the key ring %s holds a malformed key for epoch %r; it was left"
                               " as it is." % (path, epoch)) from None
    return found


class KeyRing:
    """
    The keys of one mesh by epoch: the config entry's, and the key ring
    file's (when the entry came from a config directory).
    """

    def __init__(self, mesh_id, keys=None, path=None):
        self.mesh_id = mesh_id
        self.path = path
        self._keys = dict(keys or {})
        if path is not None:
            self._keys.update(_read(path))

    @classmethod
    def of_entry(cls, entry):
        keys = {}
        if entry.mesh_key is not None:
            keys[entry.meshKeyEpoch] = entry.mesh_key
        path = keyring_path(entry.directory, entry.meshId) if entry.directory else None
        return cls(entry.meshId, keys, path)

    def get(self, epoch):
        return self._keys.get(epoch)

    def epochs(self):
        return sorted(self._keys)

    def newest(self):
        """
        The highest epoch held, or C{None}.
        """
        return max(self._keys) if self._keys else None

    def put(self, epoch, key):
        """
        Keep C{key} as the key of C{epoch}, in the file too.
        """
        self._keys[epoch] = key
        if self.path is None:
            return
        directory = os.path.dirname(self.path)
        configuration.ensure_dir(os.path.dirname(directory))
        configuration.ensure_dir(directory)
        with FileLock(self.path + ".lock"):
            # Another process may have added keys meanwhile: merge.
            keys = _read(self.path)
            keys[epoch] = key
            document = {"version": KEYRING_VERSION, "meshId": self.mesh_id, "keys": {
                str(e): crypto.encode_mesh_key(k) for e, k in sorted(keys.items())}}
            configuration.atomic_write(
                self.path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))


def keep_replaced_key(old, new):
    """
    A config entry about to be replaced by C{new}, of the same mesh (a
    re-join): keep C{old}'s key in the key ring when C{new} carries another,
    so what was sealed under its epoch stays readable.
    """
    if old.mesh_key is None or not old.directory:
        return
    if (old.meshKeyEpoch, old.mesh_key) == (new.meshKeyEpoch, new.mesh_key):
        return
    KeyRing(old.meshId, path=keyring_path(old.directory, old.meshId)).put(
        old.meshKeyEpoch, old.mesh_key)
