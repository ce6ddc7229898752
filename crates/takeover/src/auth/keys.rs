// SPDX-License-Identifier: Apache-2.0
//! Pre-shared keys: the key file, its checks, and key generation.
//!
//! The key file is text, one key per line:
//!
//! ```text
//! # comments and blank lines are allowed
//! 1 q0L2c1m1W1kq8yJ8Zs3fM1Bv0u3vRrj3oYtqk0p5b0E=
//! 2 9f0mD2yqk1n3mZ0lq0J5YkE8a7mQm1s7h8v2y9d0c3A=
//! ```
//!
//! `<key-id> <base64 key>`: the id is a number 1..=65535 (0 means "no key" on the wire), unique in
//! the file; the key is standard base64 (with `=` padding) of at least [`MIN_KEY_LEN`] random
//! bytes. Ids are numbers rather than names: two fixed bytes on the wire with nothing to validate
//! or leak, and they order, so "the newest key" (the highest id, the one a backup uses) and "the
//! next id" ([`keygen_add`]) need no operator input.
//!
//! Rotation: `keygen_add` appends a key with the next id. Install the new file on every source
//! first (a source accepts every key of its file), then on the backups (a backup uses the highest
//! id), then delete the old key's line everywhere.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use zeroize::Zeroizing;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 32;
/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Length of the keys [`keygen`] and [`keygen_add`] make, in bytes.
pub const KEYGEN_LEN: usize = 32;
/// Largest key file read, in bytes.
pub const MAX_KEY_FILE: u64 = 1 << 20;

const NEW_FILE_HEADER: &str = "\
# vmm-takeover pre-shared keys, one `<key-id> <base64 key>` per line (docs/protocol.md).
# A source accepts every key here; a backup uses the highest id. Keep this file mode 0600.
";

/// One pre-shared key. Its bytes are wiped on drop and never printed.
#[derive(Clone)]
pub struct Key {
    id: u16,
    secret: Zeroizing<Vec<u8>>,
}

impl Key {
    /// A key from its id (1..=65535) and bytes ([`MIN_KEY_LEN`]..=[`MAX_KEY_LEN`]).
    pub fn new(id: u16, secret: &[u8]) -> Result<Key, InvalidKey> {
        if id == 0 {
            return Err(InvalidKey::ZeroId);
        }
        if secret.len() < MIN_KEY_LEN {
            return Err(InvalidKey::TooShort {
                id,
                len: secret.len(),
            });
        }
        if secret.len() > MAX_KEY_LEN {
            return Err(InvalidKey::TooLong {
                id,
                len: secret.len(),
            });
        }
        Ok(Key {
            id,
            secret: Zeroizing::new(secret.to_vec()),
        })
    }

    /// A fresh key of [`KEYGEN_LEN`] bytes from the OS random number generator (`id` ≥ 1).
    fn generate(id: u16) -> Result<Key, KeyFileError> {
        let mut secret = Zeroizing::new(vec![0u8; KEYGEN_LEN]);
        getrandom::fill(&mut secret).map_err(|e| KeyFileError::Random(e.to_string()))?;
        Ok(Key { id, secret })
    }

    /// The key's id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The key's bytes.
    pub(crate) fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The key's line in a key file, in a buffer wiped on drop.
    fn line(&self) -> Zeroizing<String> {
        let mut line = Zeroizing::new(String::with_capacity(8 + self.secret.len() * 4 / 3 + 4));
        line.push_str(&self.id.to_string());
        line.push(' ');
        BASE64.encode_string(&*self.secret, &mut line);
        line.push('\n');
        line
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field(
                "secret",
                &format_args!("<redacted, {} bytes>", self.secret.len()),
            )
            .finish()
    }
}

/// A key that cannot be used, or a set of keys that cannot form a ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidKey {
    /// Id 0 means "no key" on the wire.
    #[error("key id 0 is reserved (it means \"no key\" on the wire); ids are 1..=65535")]
    ZeroId,
    /// Too few bytes.
    #[error("key {id} has {len} bytes; a key needs at least {MIN_KEY_LEN} random bytes")]
    TooShort {
        /// The key's id.
        id: u16,
        /// Its length.
        len: usize,
    },
    /// Too many bytes.
    #[error("key {id} has {len} bytes; at most {MAX_KEY_LEN} are accepted")]
    TooLong {
        /// The key's id.
        id: u16,
        /// Its length.
        len: usize,
    },
    /// Two keys with one id.
    #[error("key id {0} appears twice; ids must be unique")]
    Duplicate(u16),
    /// A ring needs a key.
    #[error("no keys")]
    Empty,
}

/// The keys of one side: every key a source accepts; a backup uses [`KeyRing::newest`].
#[derive(Clone)]
pub struct KeyRing {
    keys: BTreeMap<u16, Key>,
}

impl KeyRing {
    /// A ring of at least one key, ids unique.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Result<KeyRing, InvalidKey> {
        let mut map = BTreeMap::new();
        for k in keys {
            let id = k.id;
            if map.insert(id, k).is_some() {
                return Err(InvalidKey::Duplicate(id));
            }
        }
        if map.is_empty() {
            return Err(InvalidKey::Empty);
        }
        Ok(KeyRing { keys: map })
    }

    /// Loads a key file, refusing one that is not a regular file, that group or others may read
    /// or write, or that belongs to another user than this one or root (checked on the opened
    /// file, like ssh does for private keys), and any malformed line.
    pub fn load(path: &Path) -> Result<KeyRing, KeyFileError> {
        let mut f = File::open(path).map_err(|e| KeyFileError::io(path, e))?;
        let text = read_private(&mut f, path)?;
        KeyRing::parse(&text, path)
    }

    /// Parses a key file's text (`origin` names it in errors). Checks no permissions: see
    /// [`KeyRing::load`].
    pub fn parse(text: &str, origin: &Path) -> Result<KeyRing, KeyFileError> {
        let mut keys: BTreeMap<u16, (Key, usize)> = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |why: String| KeyFileError::Line {
                path: origin.to_path_buf(),
                line,
                why,
            };
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            // Never echo a field: a malformed line may hold (part of) a key.
            let fields: Vec<&str> = t.split_ascii_whitespace().collect();
            let [id, b64] = fields[..] else {
                return Err(bad(format!(
                    "expected `<key-id> <base64 key>` (two fields separated by spaces; comments \
                     are whole lines starting with #), found {} field(s)",
                    fields.len()
                )));
            };
            let id = parse_id(id).ok_or_else(|| {
                bad("the key id (first field) must be a number 1..=65535".to_string())
            })?;
            if let Some((_, first)) = keys.get(&id) {
                return Err(bad(format!(
                    "key id {id} is already used on line {first}; ids must be unique"
                )));
            }
            let secret = decode_key(b64).map_err(|why| bad(format!("key {id}: {why}")))?;
            let key = Key::new(id, &secret).map_err(|e| bad(e.to_string()))?;
            keys.insert(id, (key, line));
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty {
                path: origin.to_path_buf(),
            });
        }
        Ok(KeyRing {
            keys: keys.into_iter().map(|(id, (k, _))| (id, k)).collect(),
        })
    }

    /// The key with this id.
    pub fn get(&self, id: u16) -> Option<&Key> {
        self.keys.get(&id)
    }

    /// The key with the highest id: the one a backup uses.
    pub fn newest(&self) -> &Key {
        // A ring is never empty (checked by every constructor).
        self.keys
            .values()
            .next_back()
            .expect("a key ring holds at least one key")
    }

    /// The ids, ascending.
    pub fn ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.keys.keys().copied()
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A key id: decimal digits only, 1..=65535.
fn parse_id(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|&id| id != 0)
}

/// Decodes a key's base64 into a buffer wiped on drop.
fn decode_key(b64: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    if b64.len() > MAX_KEY_LEN.div_ceil(3) * 4 {
        return Err(format!("longer than {MAX_KEY_LEN} bytes"));
    }
    let mut buf = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(b64.len())]);
    let n = BASE64.decode_slice(b64, &mut buf[..]).map_err(|_| {
        "the key (second field) is not valid base64 (standard alphabet A-Z a-z 0-9 + /, with = \
         padding)"
            .to_string()
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Checks an opened key file (fstat) and reads it into a buffer wiped on drop.
fn read_private(f: &mut File, path: &Path) -> Result<Zeroizing<String>, KeyFileError> {
    let md = f.metadata().map_err(|e| KeyFileError::io(path, e))?;
    let path_buf = || path.to_path_buf();
    if !md.file_type().is_file() {
        return Err(KeyFileError::NotAFile { path: path_buf() });
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path_buf(),
            mode,
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if md.uid() != euid && md.uid() != 0 {
        return Err(KeyFileError::Owner {
            path: path_buf(),
            uid: md.uid(),
            euid,
        });
    }
    if md.len() > MAX_KEY_FILE {
        return Err(KeyFileError::TooLarge { path: path_buf() });
    }
    // Room for the whole file up front, so the buffer does not move (leaving a copy behind).
    let mut bytes = Zeroizing::new(Vec::with_capacity(md.len() as usize + 1));
    f.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| KeyFileError::io(path, e))?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(KeyFileError::TooLarge { path: path_buf() });
    }
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(e) => {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            drop(Zeroizing::new(e.into_bytes()));
            Err(KeyFileError::Line {
                path: path_buf(),
                line,
                why: "not UTF-8 text".into(),
            })
        }
    }
}

/// Writes a new key file at `path` with one fresh key (id 1, [`KEYGEN_LEN`] bytes from the OS
/// random number generator), mode 0600, created with `O_EXCL`: it never overwrites anything
/// (nor follows a symbolic link). Returns the new key's id.
pub fn keygen(path: &Path) -> Result<u16, KeyFileError> {
    let key = Key::generate(1)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => KeyFileError::Exists {
                path: path.to_path_buf(),
            },
            _ => KeyFileError::io(path, e),
        })?;
    let mut text = Zeroizing::new(String::with_capacity(NEW_FILE_HEADER.len() + 64));
    text.push_str(NEW_FILE_HEADER);
    text.push_str(&key.line());
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written {
        // Do not leave a truncated key file behind.
        let _ = std::fs::remove_file(path);
        return Err(KeyFileError::io(path, e));
    }
    Ok(key.id)
}

/// Appends a fresh key to an existing key file, with the next id (the highest plus one), for
/// rotation. The file must pass the checks of [`KeyRing::load`]. Returns the new key's id.
///
/// The line is written with one `write` in append mode; run one `keygen_add` at a time.
pub fn keygen_add(path: &Path) -> Result<u16, KeyFileError> {
    let mut f = OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| KeyFileError::io(path, e))?;
    let text = read_private(&mut f, path)?;
    let ring = KeyRing::parse(&text, path)?;
    let id = ring
        .newest()
        .id()
        .checked_add(1)
        .ok_or_else(|| KeyFileError::IdsExhausted {
            path: path.to_path_buf(),
        })?;
    let key = Key::generate(id)?;
    let mut line = Zeroizing::new(String::with_capacity(64));
    if !text.is_empty() && !text.ends_with('\n') {
        line.push('\n');
    }
    line.push_str(&key.line());
    f.write_all(line.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| KeyFileError::io(path, e))?;
    Ok(id)
}

/// Why a key file was refused. Every message names the file (and the line), and none contains
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Opening, reading or writing failed.
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Not a regular file.
    #[error("key file {}: not a regular file", path.display())]
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// Group or others may read or write it.
    #[error(
        "key file {} is accessible by group or others (mode {mode:04o}); it must be readable \
         and writable by its owner only: chmod 600 {}",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Another user owns it.
    #[error(
        "key file {} belongs to uid {uid}; it must belong to this user (uid {euid}) or root",
        path.display()
    )]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        uid: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// Larger than [`MAX_KEY_FILE`].
    #[error("key file {} is larger than {MAX_KEY_FILE} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A line that is not a comment, blank, or a valid `<key-id> <base64 key>`.
    #[error("key file {}, line {line}: {why}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based.
        line: usize,
        /// What is wrong and what is allowed.
        why: String,
    },
    /// No key in the file.
    #[error(
        "key file {} holds no key: add a line `<key-id> <base64 of at least {MIN_KEY_LEN} \
         random bytes>` (keygen writes one)",
        path.display()
    )]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// `keygen` found the file already there.
    #[error(
        "key file {} already exists; keygen never overwrites a key file (to add a key for \
         rotation, use keygen --add)",
        path.display()
    )]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// `keygen_add` found id 65535 taken.
    #[error(
        "key file {}: key id 65535 is taken, so there is no next id; delete retired keys and \
         renumber the rest",
        path.display()
    )]
    IdsExhausted {
        /// The file.
        path: PathBuf,
    },
    /// The OS random number generator failed.
    #[error("cannot make a key: {0}")]
    Random(String),
}

impl KeyFileError {
    fn io(path: &Path, source: io::Error) -> KeyFileError {
        KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
