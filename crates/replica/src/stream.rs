// SPDX-License-Identifier: Apache-2.0
//! The replication stream on a blocking socket: the link's own handshake (version 2: the same
//! pre-shared key, fresh session keys), then sealed data frames, each bound to one heartbeat link.
//!
//! ```text
//! 0      4         8          16       16+n
//! +------+---------+----------+--------+------+
//! | VMTR | len u32 | seq u64  | body   | tag  |    tag: Session::seal_data (16 bytes)
//! +------+---------+----------+--------+------+
//! ```
//!
//! The HELLO's node field carries `replica/<link id>`: the heartbeat link this stream serves.
//! The handshake binds it into both MACs, so nobody can re-point a stream at another link.
//! Everything here runs on the replication threads, never on a VMM event loop.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use vmm_takeover_core::auth::{
    self, AuthFailure, BackupHandshake, Credentials, HandshakeFailure, LinkId, OsEntropy, Reader,
    Session, SourceHandshake, WelcomeInfo,
};
use vmm_takeover_core::protocol::{ProtocolError, RejectCode};

use crate::message::{BadMessage, Message, MAX_BODY};

/// The data frames' magic.
const MAGIC: [u8; 4] = *b"VMTR";
const HEADER: usize = 4 + 4 + 8;
const TAG: usize = 16;
/// The HELLO node prefix of a replication stream.
const NODE_PREFIX: &str = "replica/";

/// Why the replication stream ended or could not start.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A socket error.
    #[error("replication stream: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream.
    #[error("replication stream closed by the peer")]
    Closed,
    /// Nothing arrived in time.
    #[error("replication stream: nothing received within {0:?}")]
    Timeout(Duration),
    /// A frame failed its checks (tag, sequence number, header).
    #[error("replication stream: {0}")]
    Protocol(#[from] ProtocolError),
    /// A frame opened but its message is malformed.
    #[error("replication stream: {0}")]
    Message(#[from] BadMessage),
    /// The frame header announces more than any message may hold.
    #[error("replication stream: a frame of {0} bytes announced, at most {MAX_BODY} are allowed")]
    Oversized(usize),
    /// The frame does not start with the stream's magic.
    #[error("replication stream: bad magic {0:02x?} (expected \"VMTR\")")]
    BadMagic([u8; 4]),
    /// The source refused the handshake.
    #[error("replication stream refused: {0}")]
    Refused(#[from] HandshakeFailure),
    /// The backup failed the source's authentication (told to the source's log only).
    #[error("replication stream: {0}")]
    Auth(#[from] AuthFailure),
    /// The HELLO names no link, or one that is not the armed backup's.
    #[error("replication stream: {0}")]
    WrongLink(String),
}

/// One authenticated replication stream.
pub struct Stream {
    sock: TcpStream,
    session: Session,
    link: LinkId,
    out: Vec<u8>,
    /// Bytes sent in data frames, tags and headers included (for benchmarks and events).
    pub bytes_sent: u64,
}

impl Stream {
    /// The heartbeat link this stream is bound to.
    pub fn link(&self) -> LinkId {
        self.link
    }

    /// The peer's address.
    pub fn peer(&self) -> io::Result<SocketAddr> {
        self.sock.peer_addr()
    }

    /// Seals and sends one message (bounded by the socket's write timeout).
    pub fn send(&mut self, m: &Message) -> Result<(), StreamError> {
        self.out.clear();
        self.out.extend_from_slice(&MAGIC);
        self.out.extend_from_slice(&[0; 12]);
        m.encode(&mut self.out);
        let body_len = self.out.len() - HEADER;
        let (seq, tag) = self.session.seal_data(&self.out[HEADER..]);
        self.out[4..8].copy_from_slice(&(body_len as u32).to_be_bytes());
        self.out[8..16].copy_from_slice(&seq.to_be_bytes());
        self.out.extend_from_slice(&tag);
        self.sock.write_all(&self.out)?;
        self.bytes_sent += self.out.len() as u64;
        Ok(())
    }

    /// Receives one message, waiting at most `timeout`. A timeout leaves the stream usable only
    /// if nothing of the next frame had arrived; callers treat any error as the stream's end.
    pub fn recv(&mut self, timeout: Duration) -> Result<Message, StreamError> {
        let deadline = Instant::now() + timeout;
        let mut header = [0u8; HEADER];
        read_exact_by(&mut self.sock, &mut header, deadline, timeout)?;
        let magic: [u8; 4] = header[..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(StreamError::BadMagic(magic));
        }
        let len = u32::from_be_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if len > MAX_BODY {
            return Err(StreamError::Oversized(len));
        }
        let seq = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
        let mut rest = vec![0u8; len + TAG];
        read_exact_by(&mut self.sock, &mut rest, deadline, timeout)?;
        let (body, tag) = rest.split_at(len);
        self.session.open_data(seq, body, tag)?;
        Ok(Message::decode(body)?)
    }
}

/// One read before `deadline`: the bytes read, never 0 (the peer's close is an error).
fn read_some(
    sock: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<usize, StreamError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StreamError::Timeout(timeout));
        }
        sock.set_read_timeout(Some(left))?;
        match sock.read(buf) {
            Ok(0) => return Err(StreamError::Closed),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(StreamError::Timeout(timeout))
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads exactly `buf.len()` bytes before `deadline`.
fn read_exact_by(
    sock: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), StreamError> {
    let mut got = 0;
    while got < buf.len() {
        got += read_some(sock, &mut buf[got..], deadline, timeout)?;
    }
    Ok(())
}

/// Reads one whole handshake frame before `deadline`.
fn read_handshake(
    sock: &mut TcpStream,
    reader: &mut Reader,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, StreamError> {
    let mut buf = [0u8; 1024];
    loop {
        if let Some(f) = reader.next_handshake()? {
            return Ok(f);
        }
        let n = read_some(sock, &mut buf, deadline, timeout)?;
        reader.push(&buf[..n]);
    }
}

fn prepare(sock: &TcpStream, timeout: Duration) -> io::Result<()> {
    sock.set_nodelay(true)?;
    sock.set_write_timeout(Some(timeout))
}

/// The backup's side: dials `addr`, proves the key, binds the stream to `link`. Every step is
/// bounded by `timeout`.
pub fn connect(
    addr: SocketAddr,
    credentials: &Credentials,
    pair_id: &str,
    link: LinkId,
    timeout: Duration,
) -> Result<Stream, StreamError> {
    let deadline = Instant::now() + timeout;
    let mut sock = TcpStream::connect_timeout(&addr, timeout)?;
    prepare(&sock, timeout)?;
    let node = format!("{NODE_PREFIX}{link}");
    let (hs, hello) = BackupHandshake::start(credentials, pair_id, &node, &mut OsEntropy::new()?);
    sock.write_all(&hello)?;
    let mut reader = Reader::new();
    let welcome = read_handshake(&mut sock, &mut reader, deadline, timeout)?;
    let w = hs.on_welcome(&welcome)?;
    sock.write_all(&w.auth)?;
    Ok(Stream {
        sock,
        session: w.session,
        link,
        out: Vec::new(),
        bytes_sent: 0,
    })
}

/// The source's side, on an accepted socket: checks the HELLO, asks `current` whether the link
/// it names is the armed backup's (it may wait a moment for the link to be announced), and
/// checks the AUTH. A failed AUTH gets the core's uniform answer after its delay.
pub fn accept(
    mut sock: TcpStream,
    credentials: &Credentials,
    pair_id: &str,
    timeout: Duration,
    current: impl Fn(LinkId) -> bool,
) -> Result<Stream, StreamError> {
    let deadline = Instant::now() + timeout;
    prepare(&sock, timeout)?;
    let mut reader = Reader::new();
    let hello = read_handshake(&mut sock, &mut reader, deadline, timeout)?;
    let hs = match SourceHandshake::on_hello(credentials, pair_id, &hello, &mut OsEntropy::new()?) {
        Ok(h) => h,
        Err(e) => {
            let _ = sock.write_all(&auth::reject_for_error(&e));
            return Err(e.into());
        }
    };
    let link = hs
        .peer_node()
        .strip_prefix(NODE_PREFIX)
        .and_then(LinkId::from_hex);
    let Some(link) = link else {
        let _ = sock.write_all(&hs.reject(RejectCode::Malformed, "not a replication stream"));
        return Err(StreamError::WrongLink(format!(
            "the HELLO names {:?}, not `{NODE_PREFIX}<link id>`",
            hs.peer_node()
        )));
    };
    if !current(link) {
        let _ = sock.write_all(&hs.reject(
            RejectCode::Busy,
            "this stream's link is not the armed backup's link",
        ));
        return Err(StreamError::WrongLink(format!(
            "link {link} is not the armed backup's link"
        )));
    }
    let info = WelcomeInfo {
        heartbeat: None,
        node: String::new(),
        fence_grace: Duration::ZERO,
    };
    let (awaiting, welcome) = hs.welcome(&info);
    sock.write_all(&welcome)?;
    let auth_frame = read_handshake(&mut sock, &mut reader, deadline, timeout);
    let accepted = match auth_frame.map(|f| awaiting.on_auth(&f)) {
        Ok(Ok(a)) => a,
        Ok(Err(failure)) => {
            let (bytes, delay) = auth::auth_failure_answer();
            std::thread::sleep(delay);
            let _ = sock.write_all(bytes);
            return Err(failure.into());
        }
        Err(e) => return Err(e),
    };
    Ok(Stream {
        sock,
        session: accepted.session,
        link,
        out: Vec::new(),
        bytes_sent: 0,
    })
}
