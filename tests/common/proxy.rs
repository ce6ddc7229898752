// SPDX-License-Identifier: Apache-2.0
//! A transparent TCP proxy between a backup and its source: the attacker on the path. It
//! forwards whole frames (both versions share the 8-byte header: magic, version, kind, length),
//! records them, and lets a test drop, alter or inject frames in the source → backup direction.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What the proxy does with one frame from the source.
pub enum Verdict {
    Pass,
    Drop,
    Replace(Vec<u8>),
}

/// Decides per frame from the source: `(connection number, frame number on it, frame bytes)`.
type Rule = Box<dyn FnMut(usize, usize, &[u8]) -> Verdict + Send>;

#[derive(Default)]
struct State {
    rule: Option<Rule>,
    /// Frames queued for injection into the newest connection's source → backup stream.
    inject: Vec<Vec<u8>>,
    /// Every frame seen, per direction: `(connection, bytes)`.
    s2b: Vec<(usize, Vec<u8>)>,
    b2s: Vec<(usize, Vec<u8>)>,
}

pub struct Proxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    conns: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

/// The kind byte of a frame.
pub fn kind(frame: &[u8]) -> u8 {
    frame[5]
}

/// Splits whole frames off the front of `buf`.
fn frames(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while buf.len() >= 8 {
        let len = 8 + u16::from_be_bytes([buf[6], buf[7]]) as usize;
        if buf.len() < len {
            break;
        }
        out.push(buf.drain(..len).collect());
    }
    out
}

impl Proxy {
    /// Listens on loopback and forwards every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let conns = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, cn, sp) = (state.clone(), conns.clone(), stop.clone());
        thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let Ok(up) = TcpStream::connect(upstream) else {
                            continue;
                        };
                        let n = cn.fetch_add(1, Ordering::SeqCst);
                        pump(n, down, up, st.clone(), cn.clone(), sp.clone());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            addr,
            state,
            conns,
            stop,
        }
    }

    /// Where the backup connects.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Applies `rule` to every frame from the source from now on.
    pub fn set_rule(&self, rule: impl FnMut(usize, usize, &[u8]) -> Verdict + Send + 'static) {
        self.state.lock().unwrap().rule = Some(Box::new(rule));
    }

    /// Injects `frame` into the newest connection's stream to the backup, between two frames.
    pub fn inject(&self, frame: Vec<u8>) {
        self.state.lock().unwrap().inject.push(frame);
    }

    /// Frames of `kind` the source sent, in order, with their connection number.
    pub fn sent_by_source(&self, kind_byte: u8) -> Vec<(usize, Vec<u8>)> {
        let st = self.state.lock().unwrap();
        st.s2b
            .iter()
            .filter(|(_, f)| kind(f) == kind_byte)
            .cloned()
            .collect()
    }

    /// Frames the backup sent, in order, with their connection number.
    pub fn sent_by_backup(&self) -> Vec<(usize, Vec<u8>)> {
        self.state.lock().unwrap().b2s.clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Two threads per connection: backup → source records; source → backup also applies the rule
/// and injects. Either side closing closes the other.
fn pump(
    n: usize,
    down: TcpStream,
    up: TcpStream,
    state: Arc<Mutex<State>>,
    conns: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let (mut d_rd, mut d_wr) = (down.try_clone().unwrap(), down);
    let (mut u_rd, mut u_wr) = (up.try_clone().unwrap(), up);
    let st = state.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut pending = Vec::new();
        loop {
            match d_rd.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    pending.extend_from_slice(&buf[..k]);
                    for f in frames(&mut pending) {
                        st.lock().unwrap().b2s.push((n, f.clone()));
                        if u_wr.write_all(&f).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let _ = u_wr.shutdown(Shutdown::Write);
    });
    thread::spawn(move || {
        u_rd.set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut pending = Vec::new();
        let mut count = 0usize;
        loop {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            // Injections go to the newest connection only, between whole frames.
            let inject: Vec<Vec<u8>> = {
                let mut s = state.lock().unwrap();
                if conns.load(Ordering::SeqCst) == n + 1 {
                    std::mem::take(&mut s.inject)
                } else {
                    Vec::new()
                }
            };
            for f in inject {
                if d_wr.write_all(&f).is_err() {
                    return;
                }
            }
            match u_rd.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    pending.extend_from_slice(&buf[..k]);
                    for f in frames(&mut pending) {
                        let verdict = {
                            let mut s = state.lock().unwrap();
                            s.s2b.push((n, f.clone()));
                            match s.rule.as_mut() {
                                Some(r) => r(n, count, &f),
                                None => Verdict::Pass,
                            }
                        };
                        count += 1;
                        let out = match verdict {
                            Verdict::Pass => f,
                            Verdict::Drop => continue,
                            Verdict::Replace(g) => g,
                        };
                        if d_wr.write_all(&out).is_err() {
                            return;
                        }
                    }
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        let _ = d_wr.shutdown(Shutdown::Write);
    });
}
