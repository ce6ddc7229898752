// SPDX-License-Identifier: Apache-2.0
//! The replication stream's messages: pure encoding and decoding, no I/O.
//!
//! One checkpoint is `BEGIN`, any number of `PAGES`, then `COMMIT`; the backup answers `ACK`.
//! Each message is the body of one sealed data frame (see [`crate::stream`]).
//!
//! ```text
//! BEGIN   1 | seq u64 | reset u8 | guest u32           reset: zero all guest memory first;
//!                                                     guest: the source's guest size in pages
//! PAGES   2 | n u16 | n × index u32 | n × 4096 bytes    n ≤ MAX_PAGES_PER_MESSAGE
//! COMMIT  3 | seq u64 | mark u64 | pages u32 | state_len u32 | state
//! ACK     4 | seq u64
//! ```
//! All integers big-endian. `mark` is the guest's output position the checkpoint covers (the
//! dummy guest's counter); `pages` counts every page sent since BEGIN, so a COMMIT that does not
//! close exactly what was received is refused; `state` is the VMM's opaque vCPU and device
//! state.

use crate::PAGE_SIZE;

/// Pages in one PAGES message (256 KiB of page data).
pub const MAX_PAGES_PER_MESSAGE: usize = 64;
/// The largest opaque state a COMMIT may carry.
pub const MAX_STATE: usize = 256 * 1024;
/// The largest message body either side accepts (a PAGES message is the largest).
pub const MAX_BODY: usize = 1 + 2 + MAX_PAGES_PER_MESSAGE * (4 + PAGE_SIZE);

const BEGIN: u8 = 1;
const PAGES: u8 = 2;
const COMMIT: u8 = 3;
const ACK: u8 = 4;

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A checkpoint starts.
    Begin {
        /// Its number: 1 for the first of a stream, then one more each time.
        seq: u64,
        /// Zero all guest memory before applying (the first checkpoint of a stream: full).
        reset: bool,
        /// The source's guest memory in pages: a standby of another size cannot hold it.
        guest_pages: u32,
    },
    /// Guest pages of the checkpoint under way.
    Pages {
        /// Page indexes (guest-physical address / [`PAGE_SIZE`]).
        index: Vec<u32>,
        /// `index.len() × PAGE_SIZE` bytes, in the same order.
        data: Vec<u8>,
    },
    /// The checkpoint is complete: apply it.
    Commit {
        /// The checkpoint's number (as its BEGIN).
        seq: u64,
        /// The output position it covers.
        mark: u64,
        /// Pages sent since its BEGIN.
        pages: u32,
        /// Opaque vCPU (and device) state.
        state: Vec<u8>,
    },
    /// The backup applied checkpoint `seq`.
    Ack {
        /// The checkpoint.
        seq: u64,
    },
}

/// Why a message does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed replication message: {0}")]
pub struct BadMessage(pub String);

impl Message {
    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Begin { .. } => "BEGIN",
            Message::Pages { .. } => "PAGES",
            Message::Commit { .. } => "COMMIT",
            Message::Ack { .. } => "ACK",
        }
    }

    /// Appends the encoded message to `out`.
    ///
    /// # Panics
    ///
    /// If a PAGES message breaks its own limits (more than [`MAX_PAGES_PER_MESSAGE`] pages, data
    /// not `PAGE_SIZE` per page) or a COMMIT's state exceeds [`MAX_STATE`]: the sender builds
    /// them, so that is a bug there.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Begin {
                seq,
                reset,
                guest_pages,
            } => {
                out.push(BEGIN);
                out.extend_from_slice(&seq.to_be_bytes());
                out.push(u8::from(*reset));
                out.extend_from_slice(&guest_pages.to_be_bytes());
            }
            Message::Pages { index, data } => {
                assert!(
                    index.len() <= MAX_PAGES_PER_MESSAGE && data.len() == index.len() * PAGE_SIZE
                );
                out.push(PAGES);
                out.extend_from_slice(&(index.len() as u16).to_be_bytes());
                for i in index {
                    out.extend_from_slice(&i.to_be_bytes());
                }
                out.extend_from_slice(data);
            }
            Message::Commit {
                seq,
                mark,
                pages,
                state,
            } => {
                assert!(state.len() <= MAX_STATE);
                out.push(COMMIT);
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&mark.to_be_bytes());
                out.extend_from_slice(&pages.to_be_bytes());
                out.extend_from_slice(&(state.len() as u32).to_be_bytes());
                out.extend_from_slice(state);
            }
            Message::Ack { seq } => {
                out.push(ACK);
                out.extend_from_slice(&seq.to_be_bytes());
            }
        }
    }

    /// Decodes one whole body; every length is checked before it is used.
    pub fn decode(body: &[u8]) -> Result<Message, BadMessage> {
        let bad = |why: String| BadMessage(why);
        let (&kind, mut rest) = body
            .split_first()
            .ok_or_else(|| bad("empty message".into()))?;
        let m = match kind {
            BEGIN => {
                let seq = take_u64(&mut rest, "BEGIN seq")?;
                let reset = match take(&mut rest, 1, "BEGIN reset")? {
                    [0] => false,
                    [1] => true,
                    [b] => return Err(bad(format!("BEGIN reset is {b}, expected 0 or 1"))),
                    _ => unreachable!("take returned one byte"),
                };
                let guest_pages = take_u32(&mut rest, "BEGIN guest pages")?;
                Message::Begin {
                    seq,
                    reset,
                    guest_pages,
                }
            }
            PAGES => {
                let n = usize::from(u16::from_be_bytes(
                    take(&mut rest, 2, "PAGES count")?
                        .try_into()
                        .expect("2 bytes"),
                ));
                if n > MAX_PAGES_PER_MESSAGE {
                    return Err(bad(format!(
                        "PAGES carries {n} pages, at most {MAX_PAGES_PER_MESSAGE} are allowed"
                    )));
                }
                let mut index = Vec::with_capacity(n);
                for _ in 0..n {
                    index.push(take_u32(&mut rest, "PAGES index")?);
                }
                let data = take(&mut rest, n * PAGE_SIZE, "PAGES data")?.to_vec();
                Message::Pages { index, data }
            }
            COMMIT => {
                let seq = take_u64(&mut rest, "COMMIT seq")?;
                let mark = take_u64(&mut rest, "COMMIT mark")?;
                let pages = take_u32(&mut rest, "COMMIT pages")?;
                let len = take_u32(&mut rest, "COMMIT state length")? as usize;
                if len > MAX_STATE {
                    return Err(bad(format!(
                        "COMMIT state of {len} bytes, at most {MAX_STATE} are allowed"
                    )));
                }
                let state = take(&mut rest, len, "COMMIT state")?.to_vec();
                Message::Commit {
                    seq,
                    mark,
                    pages,
                    state,
                }
            }
            ACK => Message::Ack {
                seq: take_u64(&mut rest, "ACK seq")?,
            },
            k => return Err(bad(format!("unknown message type {k} (expected 1 to 4)"))),
        };
        if !rest.is_empty() {
            return Err(bad(format!(
                "{} followed by {} stray bytes",
                m.name(),
                rest.len()
            )));
        }
        Ok(m)
    }
}

fn take<'a>(rest: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], BadMessage> {
    if rest.len() < n {
        return Err(BadMessage(format!(
            "{what}: {n} bytes needed, {} left",
            rest.len()
        )));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_u64(rest: &mut &[u8], what: &str) -> Result<u64, BadMessage> {
    Ok(u64::from_be_bytes(
        take(rest, 8, what)?.try_into().expect("8 bytes"),
    ))
}

fn take_u32(rest: &mut &[u8], what: &str) -> Result<u32, BadMessage> {
    Ok(u32::from_be_bytes(
        take(rest, 4, what)?.try_into().expect("4 bytes"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Begin {
                seq: 1,
                reset: true,
                guest_pages: 256,
            },
            Message::Begin {
                seq: u64::MAX,
                reset: false,
                guest_pages: 0,
            },
            Message::Pages {
                index: vec![],
                data: vec![],
            },
            Message::Pages {
                index: vec![16, 17, 4095],
                data: (0..3 * PAGE_SIZE).map(|i| i as u8).collect(),
            },
            Message::Commit {
                seq: 9,
                mark: 123_456,
                pages: 3,
                state: b"regs".to_vec(),
            },
            Message::Ack { seq: 9 },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let mut b = Vec::new();
            m.encode(&mut b);
            assert!(b.len() <= MAX_BODY);
            assert_eq!(Message::decode(&b).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        for m in samples() {
            let mut b = Vec::new();
            m.encode(&mut b);
            for cut in 0..b.len() {
                assert!(
                    Message::decode(&b[..cut]).is_err(),
                    "{} cut at {cut}",
                    m.name()
                );
            }
            b.push(0);
            let e = Message::decode(&b).unwrap_err();
            assert!(e.to_string().contains("stray"), "{e}");
        }
    }

    #[test]
    fn limits_and_unknown_types_are_named() {
        let e = Message::decode(&[9]).unwrap_err();
        assert!(e.to_string().contains("unknown message type 9"), "{e}");
        let e = Message::decode(&[PAGES, 0, 65]).unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
        let mut b = vec![COMMIT];
        b.extend_from_slice(&[0; 20]);
        b.extend_from_slice(&(MAX_STATE as u32 + 1).to_be_bytes());
        let e = Message::decode(&b).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let e = Message::decode(&[BEGIN, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0]).unwrap_err();
        assert!(e.to_string().contains("expected 0 or 1"), "{e}");
    }
}
