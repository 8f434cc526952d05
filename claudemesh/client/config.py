"""
The client's configuration: the meshes this machine joined, with their keys.

Layout (docs/cli.md)::

    $CLAUDEMESH_CONFIG_DIR or ~/.claudemesh/      mode 0700
        config.json                               mode 0600, written atomically
        sessions/<mesh slug>/<session id>.json    session keys of long-lived clients
        keys/<meshId>.json                        mesh keys of later epochs, 0600

C{config.json} is C{{version: 1, meshes: [...], defaultMesh?}}; each mesh
entry holds the original's fields (C{meshId, memberId, slug, name, pubkey,
secretKey, brokerUrl, joinedAt}) plus ours (C{meshKey, role, displayName},
C{meshKeyEpoch} when the key is of a later epoch than 0, C{meshKeyCheck} and
C{meshKeyCheckEpoch}, C{groups}). Unknown keys of an entry are kept as they
were, so a newer client's fields survive an older client's write.

The mesh a command acts on (L{choose}): C{--mesh}, else C{$CLAUDEMESH_MESH},
else C{defaultMesh} (set by C{claudemesh use}), else the only one joined.

A file that cannot be read as such a document is never overwritten: every
reader raises L{ConfigError} with a message fit for a terminal.
"""

import json
import os
import re
import tempfile

import attr

from claudemesh import crypto

CONFIG_VERSION = 1
CONFIG_FILE = "config.json"
SESSIONS_DIR = "sessions"

_SAFE_COMPONENT = re.compile(r"\A[A-Za-z0-9._-]{1,128}\Z")


class ConfigError(Exception):
    """
    The configuration is missing something, corrupt, or not ours. The message
    is meant for the user as it is.
    """


def config_dir(environ=None):
    """
    The configuration directory: C{$CLAUDEMESH_CONFIG_DIR}, else
    C{~/.claudemesh}.
    """
    environ = os.environ if environ is None else environ
    value = environ.get("CLAUDEMESH_CONFIG_DIR")
    if value:
        return os.path.abspath(os.path.expanduser(value))
    return os.path.join(os.path.expanduser("~"), ".claudemesh")


@attr.s(auto_attribs=True)
class MeshEntry:
    """
    One joined mesh: the member identity on it and how to reach its broker.
    """

    meshId: str
    memberId: str
    slug: str
    name: str
    pubkey: str
    secretKey: str
    brokerUrl: str
    joinedAt: str
    meshKey: str = ""
    role: str = "member"
    displayName: str | None = None
    # The invite's check value of the mesh key (hex), when the invite had
    # one or this machine created the mesh: lets doctor verify the key.
    meshKeyCheck: str | None = None
    # Groups every session of this machine joins in its hello.
    groups: list = attr.ib(factory=list)
    extra: dict = attr.ib(factory=dict)
    # The key epoch of meshKey (issue 17): 0 for the key a mesh started
    # with, N for a link made after its N-th rotation. Other epochs' keys
    # live in the key ring (claudemesh.client.meshkeys).
    meshKeyEpoch: int = 0
    # The epoch of the key meshKeyCheck was made for.
    meshKeyCheckEpoch: int = 0
    # The config directory this entry was read from (not stored), where its
    # key ring is kept; None for an entry made in memory.
    directory: str | None = attr.ib(default=None, eq=False)

    REQUIRED = ("meshId", "memberId", "slug", "name", "pubkey", "secretKey", "brokerUrl",
                "joinedAt")

    @property
    def identity(self):
        return crypto.Identity.from_secret_hex(self.secretKey)

    @property
    def mesh_key(self):
        """
        The 32-byte mesh key, or C{None} when this entry has none.
        """
        return crypto.decode_mesh_key(self.meshKey) if self.meshKey else None

    @classmethod
    def from_json(cls, obj, where):
        if not isinstance(obj, dict):
            raise ConfigError("%s: each entry of 'meshes' must be an object" % (where,))
        for key in cls.REQUIRED:
            if not isinstance(obj.get(key), str) or not obj.get(key):
                raise ConfigError("%s: a mesh entry lacks the field %r" % (where, key))
        if not crypto.is_pubkey(obj["pubkey"]):
            raise ConfigError("%s: mesh %r has a malformed pubkey" % (where, obj["slug"]))
        try:
            identity = crypto.Identity.from_secret_hex(obj["secretKey"])
        except (ValueError, TypeError):
            raise ConfigError(
                "%s: mesh %r has a malformed secretKey" % (where, obj["slug"])) from None
        if identity.pubkey != obj["pubkey"]:
            raise ConfigError(
                "%s: mesh %r: secretKey does not match pubkey" % (where, obj["slug"]))
        mesh_key = obj.get("meshKey") or ""
        if mesh_key:
            try:
                crypto.decode_mesh_key(mesh_key)
            except (ValueError, TypeError):
                raise ConfigError(
                    "%s: mesh %r has a malformed meshKey" % (where, obj["slug"])) from None
        epoch = obj.get("meshKeyEpoch", 0)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError("%s: mesh %r has a malformed meshKeyEpoch" % (where, obj["slug"]))
        known = set(cls.REQUIRED) | {"meshKey", "role", "displayName", "meshKeyEpoch",
                                     "meshKeyCheck", "meshKeyCheckEpoch", "groups"}
        check = obj.get("meshKeyCheck")
        check_epoch = obj.get("meshKeyCheckEpoch", 0)
        if isinstance(check_epoch, bool) or not isinstance(check_epoch, int):
            check_epoch = 0
        groups = obj.get("groups")
        return cls(
            **{k: obj[k] for k in cls.REQUIRED},
            meshKey=mesh_key,
            role=obj.get("role") if isinstance(obj.get("role"), str) else "member",
            displayName=obj.get("displayName") if isinstance(obj.get("displayName"), str)
            else None,
            meshKeyCheck=check if isinstance(check, str) and check else None,
            groups=[g for g in groups if isinstance(g, dict) and isinstance(g.get("name"), str)]
            if isinstance(groups, list) else [],
            extra={k: v for k, v in obj.items() if k not in known},
            meshKeyEpoch=epoch,
            meshKeyCheckEpoch=check_epoch,
        )

    def to_json(self):
        obj = dict(self.extra)
        for key in self.REQUIRED:
            obj[key] = getattr(self, key)
        obj["meshKey"] = self.meshKey
        obj["role"] = self.role
        if self.displayName is not None:
            obj["displayName"] = self.displayName
        if self.meshKeyEpoch:
            obj["meshKeyEpoch"] = self.meshKeyEpoch
        if self.meshKeyCheck:
            obj["meshKeyCheck"] = self.meshKeyCheck
            if self.meshKeyCheckEpoch:
                obj["meshKeyCheckEpoch"] = self.meshKeyCheckEpoch
        if self.groups:
            obj["groups"] = self.groups
        return obj

    def key_verified(self):
        """
        C{True} when the mesh key matches the check value the invite (or
        the mesh's creation) gave, C{False} when it does not, C{None} when
        there is nothing to compare (no key, no check value, or a check
        value of another key epoch than the key's).
        """
        if not self.meshKey or not self.meshKeyCheck:
            return None
        if self.meshKeyCheckEpoch != self.meshKeyEpoch:
            return None
        return crypto.mesh_key_check(self.mesh_key, self.meshId) == self.meshKeyCheck


@attr.s(auto_attribs=True)
class Config:
    """
    The whole C{config.json}: joined meshes plus any other top-level keys,
    kept as read.
    """

    meshes: list = attr.ib(factory=list)
    extra: dict = attr.ib(factory=dict)
    # The slug 'claudemesh use' chose, or None.
    defaultMesh: str | None = None

    def find(self, slug):
        for entry in self.meshes:
            if entry.slug == slug:
                return entry
        return None

    def put(self, entry):
        """
        Add C{entry}, replacing one with the same slug.
        """
        self.meshes = [m for m in self.meshes if m.slug != entry.slug] + [entry]

    def remove(self, slug):
        before = len(self.meshes)
        self.meshes = [m for m in self.meshes if m.slug != slug]
        if self.defaultMesh == slug:
            self.defaultMesh = None
        return len(self.meshes) != before

    def select(self, slug=None, source=None):
        """
        The mesh a command acts on: C{slug} when given, else the default
        set by C{claudemesh use}, else the only one.

        @param source: where C{slug} came from (e.g. C{"CLAUDEMESH_MESH"}),
            named in the error when it is unknown.
        @raise ConfigError: none joined, unknown slug, or several and no slug.
        """
        if slug is None and self.defaultMesh and self.find(self.defaultMesh) is not None:
            return self.find(self.defaultMesh)
        if slug is not None:
            entry = self.find(slug)
            if entry is None:
                raise ConfigError(
                    'Not a member of a mesh called "%s"%s (joined: %s).'
                    % (slug, " (from %s)" % (source,) if source else "",
                       ", ".join(m.slug for m in self.meshes) or "none"))
            return entry
        if not self.meshes:
            raise ConfigError(
                "No meshes joined. Run 'claudemesh join <invite link>' or "
                "'claudemesh new <name>' first.")
        if len(self.meshes) > 1:
            raise ConfigError(
                "Several meshes joined (%s): pick one with --mesh <slug>, or make one "
                "the default with 'claudemesh use <slug>'."
                % (", ".join(m.slug for m in self.meshes),))
        return self.meshes[0]

    def to_json(self):
        obj = dict(self.extra)
        obj["version"] = CONFIG_VERSION
        obj["meshes"] = [m.to_json() for m in self.meshes]
        if self.defaultMesh:
            obj["defaultMesh"] = self.defaultMesh
        return obj


MESH_VARIABLE = "CLAUDEMESH_MESH"


def choose(config, flag=None, environ=None):
    """
    The mesh a one-mesh command acts on: C{--mesh} (C{flag}), else
    C{$CLAUDEMESH_MESH}, else the default of C{claudemesh use}, else the
    only one joined.

    @raise ConfigError: as L{Config.select}.
    """
    environ = os.environ if environ is None else environ
    if flag:
        return config.select(flag)
    if environ.get(MESH_VARIABLE):
        return config.select(environ[MESH_VARIABLE], source="$" + MESH_VARIABLE)
    return config.select()


def ensure_dir(path):
    """
    Create C{path} (and parents) if needed and make it 0700.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def load(directory):
    """
    Read C{config.json} from C{directory}; an absent file is an empty config.

    @raise ConfigError: unreadable, not JSON, or not our shape.
    """
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise ConfigError("cannot read %s: %s" % (path, e.strerror or e)) from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(
            "%s is not valid JSON (%s); fix or move it away — it was left as it is."
            % (path, e)) from None
    if not isinstance(obj, dict) or "meshes" not in obj:
        raise ConfigError(
            "%s is not a claudemesh config (no 'meshes'); it was left as it is." % (path,))
    version = obj.get("version")
    if version != CONFIG_VERSION:
        raise ConfigError(
            "%s has version %r; this claudemesh reads version %d. It was left as it is."
            % (path, version, CONFIG_VERSION))
    if not isinstance(obj["meshes"], list):
        raise ConfigError("%s: 'meshes' must be a list; it was left as it is." % (path,))
    entries = [MeshEntry.from_json(item, path) for item in obj["meshes"]]
    for entry in entries:
        entry.directory = directory
    extra = {k: v for k, v in obj.items() if k not in ("version", "meshes", "defaultMesh")}
    default = obj.get("defaultMesh")
    return Config(entries, extra, default if isinstance(default, str) and default else None)


def atomic_write(path, data: bytes, mode=0o600):
    """
    Replace C{path} with C{data} so that a reader sees the old file or the
    new one, never half of it: a temporary file in the same directory, made
    C{mode}, synced, then renamed over it.
    """
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save(directory, config):
    """
    Write C{config} to C{directory}/config.json atomically, mode 0600.
    """
    ensure_dir(directory)
    data = (json.dumps(config.to_json(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    atomic_write(os.path.join(directory, CONFIG_FILE), data)


# -- session keys -------------------------------------------------------------


def _component(value, what):
    if not _SAFE_COMPONENT.match(value) or value in (".", ".."):
        raise ConfigError("%s %r cannot name a file" % (what, value))
    return value


def session_key(directory, slug, session_id):
    """
    The session key of (mesh, session id), made and stored (0600) on first
    use, so a long-lived session that restarts can still open the direct
    messages queued for its session key.
    """
    folder = os.path.join(directory, SESSIONS_DIR, _component(slug, "mesh slug"))
    path = os.path.join(folder, _component(session_id, "session id") + ".json")
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
        identity = crypto.Identity.from_secret_hex(obj["secretKey"])
        if identity.pubkey != obj.get("publicKey"):
            raise ValueError("key mismatch")
        return identity
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError("session key file %s is unreadable (%s); it was left as it is."
                          % (path, e)) from None
    ensure_dir(directory)
    ensure_dir(os.path.join(directory, SESSIONS_DIR))
    ensure_dir(folder)
    identity = crypto.Identity.generate()
    document = {"version": 1, "meshSlug": slug, "sessionId": session_id,
                "publicKey": identity.pubkey, "secretKey": identity.secret_hex}
    atomic_write(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"))
    return identity
