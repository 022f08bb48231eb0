//! The frame codec: a sans-IO state machine.
//!
//! On the wire every message is one frame: a 4-byte big-endian length `n`
//! followed by `n` bytes of UTF-8 JSON, one object with a `"type"` field.
//! [`FrameDecoder`] is fed bytes as they arrive (in any split) and yields
//! complete, parsed frames; [`encode`] does the reverse. No sockets, no async:
//! the QUIC layer is a thin loop around these.
//!
//! A decoding error poisons the decoder: the peer broke the protocol and its
//! stream is closed with [`FrameError::code`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ErrorCode;

/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;
/// Default largest frame body accepted, in bytes (1 MiB).
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;

/// Why bytes could not be turned into a frame (or a frame into bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit. The stream must be closed.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated { have: usize, want: usize },
    /// The body is not UTF-8.
    #[error("frame body is not valid UTF-8: {0}")]
    InvalidUtf8(String),
    /// The body is not JSON, or not an object with a known `type` and the right fields.
    #[error("invalid frame: {0}")]
    InvalidJson(String),
    /// The body is a JSON object whose `type` is not known here.
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    /// An earlier error ended this stream.
    #[error("the stream already failed")]
    Poisoned,
    /// A frame to send could not be serialized.
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

impl FrameError {
    /// The error code sent to the peer before closing.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Truncated { .. }
            | FrameError::InvalidUtf8(_)
            | FrameError::InvalidJson(_)
            | FrameError::Poisoned => ErrorCode::InvalidFrame,
            FrameError::UnknownType(_) => ErrorCode::BadRequest,
            FrameError::Encode(_) => ErrorCode::Internal,
        }
    }
}

/// Serializes `msg` as one frame (length prefix + JSON).
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    if body.len() > max {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max,
        });
    }
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max,
    })?;
    let mut out = Vec::with_capacity(LENGTH_PREFIX + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Incremental decoder for one stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
    poisoned: bool,
}

impl FrameDecoder {
    /// A decoder that refuses frames larger than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            poisoned: false,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if !self.poisoned {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, parsed as `T`, or `None` if more bytes are needed.
    /// The length is checked as soon as its 4 bytes arrive, so an oversize
    /// frame is refused before its body is buffered.
    #[allow(clippy::should_implement_trait)] // fallible and generic: not an Iterator
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        let Some(prefix) = self.buf.get(..LENGTH_PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max {
            return Err(self.fail(FrameError::TooLarge { len, max: self.max }));
        }
        if self.buf.len() < LENGTH_PREFIX + len {
            return Ok(None);
        }
        let body: Vec<u8> = self
            .buf
            .drain(..LENGTH_PREFIX + len)
            .skip(LENGTH_PREFIX)
            .collect();
        match parse(&body) {
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Call when the stream ended: an incomplete frame is an error.
    pub fn finish(&mut self) -> Result<(), FrameError> {
        if self.poisoned {
            return Err(FrameError::Poisoned);
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let want = self
            .buf
            .get(..LENGTH_PREFIX)
            .map(|p| LENGTH_PREFIX + u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize)
            .unwrap_or(LENGTH_PREFIX);
        let have = self.buf.len();
        Err(self.fail(FrameError::Truncated { have, want }))
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.poisoned = true;
        self.buf = Vec::new();
        e
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let text = std::str::from_utf8(body).map_err(|e| FrameError::InvalidUtf8(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    let Some(ty) = value
        .get("type")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
    else {
        return Err(FrameError::InvalidJson(
            "a frame must be a JSON object with a string \"type\"".into(),
        ));
    };
    serde_json::from_value(value).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("unknown variant") {
            FrameError::UnknownType(ty.chars().take(64).collect())
        } else {
            FrameError::InvalidJson(msg)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ClientFrame, ServerFrame};

    fn hello() -> ClientFrame {
        ClientFrame::Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            token: Some("t0k3n".into()),
            client_name: "test".into(),
        }
    }

    fn send(text: &str) -> ClientFrame {
        ClientFrame::SendMessage {
            session_id: None,
            text: text.into(),
            idempotency_key: format!("k-{text}"),
        }
    }

    #[test]
    fn byte_by_byte_delivery() {
        let bytes = encode(&hello(), DEFAULT_MAX_FRAME).unwrap();
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        for (i, b) in bytes.iter().enumerate() {
            d.push(&[*b]);
            let got: Option<ClientFrame> = d.next().unwrap();
            if i + 1 < bytes.len() {
                assert!(got.is_none(), "early frame at byte {i}");
            } else {
                assert_eq!(got, Some(hello()));
            }
        }
        d.finish().unwrap();
    }

    #[test]
    fn concatenated_and_split_frames() {
        let mut all = Vec::new();
        for t in ["a", "bb", "ccc"] {
            all.extend(encode(&send(t), DEFAULT_MAX_FRAME).unwrap());
        }
        for split in [1, 3, 7, all.len() / 2, all.len()] {
            let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
            let mut got = Vec::new();
            for chunk in all.chunks(split) {
                d.push(chunk);
                while let Some(f) = d.next::<ClientFrame>().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(
                got,
                vec![send("a"), send("bb"), send("ccc")],
                "split {split}"
            );
            d.finish().unwrap();
        }
    }

    #[test]
    fn oversize_length_is_refused_before_the_body() {
        let mut d = FrameDecoder::new(16);
        d.push(&1000u32.to_be_bytes());
        let err = d.next::<ClientFrame>().unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: 1000, max: 16 });
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.next::<ClientFrame>(), Err(FrameError::Poisoned));
        assert!(matches!(
            encode(&send(&"x".repeat(100)), 16),
            Err(FrameError::TooLarge { .. })
        ));
        // u32::MAX as a length is refused too.
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        d.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            d.next::<ClientFrame>(),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncation_is_detected_at_end_of_stream() {
        let bytes = encode(&hello(), DEFAULT_MAX_FRAME).unwrap();
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        d.push(&bytes[..bytes.len() - 3]);
        assert_eq!(d.next::<ClientFrame>().unwrap(), None);
        let err = d.finish().unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err}");
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        d.push(&[0, 0]);
        assert!(matches!(
            d.finish(),
            Err(FrameError::Truncated { have: 2, want: 4 })
        ));
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn bad_bodies_are_errors_with_codes() {
        type Check = fn(&FrameError) -> bool;
        let cases: Vec<(&[u8], Check)> = vec![
            (b"\xff\xfe{}", |e| matches!(e, FrameError::InvalidUtf8(_))),
            (b"{not json", |e| matches!(e, FrameError::InvalidJson(_))),
            (b"[1,2,3]", |e| matches!(e, FrameError::InvalidJson(_))),
            (b"{\"no_type\":1}", |e| matches!(e, FrameError::InvalidJson(_))),
            (b"{\"type\":\"launch_missiles\"}", |e| {
                matches!(e, FrameError::UnknownType(t) if t == "launch_missiles")
            }),
            (b"{\"type\":\"send_message\"}", |e| matches!(e, FrameError::InvalidJson(_))),
            (
                b"{\"type\":\"send_message\",\"text\":\"x\",\"idempotency_key\":\"k\",\"session_id\":\"a;b\"}",
                |e| matches!(e, FrameError::InvalidJson(_)),
            ),
            (b"", |e| matches!(e, FrameError::InvalidJson(_))),
        ];
        for (body, check) in cases {
            let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
            d.push(&frame(body));
            let err = d.next::<ClientFrame>().unwrap_err();
            assert!(check(&err), "{body:?}: {err:?}");
            assert_ne!(err.code(), ErrorCode::Internal);
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = vec![
            ServerFrame::Welcome {
                server_version: "0.1.0".into(),
                protocol_version: crate::PROTOCOL_VERSION,
                max_frame_size: DEFAULT_MAX_FRAME as u64,
            },
            ServerFrame::Event(crate::AgentEvent::TextDelta { text: "hi".into() }),
            ServerFrame::Error {
                code: ErrorCode::Unauthorized,
                message: "bad token".into(),
            },
        ];
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        for f in &frames {
            d.push(&encode(f, DEFAULT_MAX_FRAME).unwrap());
        }
        for f in frames {
            assert_eq!(d.next::<ServerFrame>().unwrap(), Some(f));
        }
    }

    /// A seeded xorshift64*: deterministic pseudo-random bytes, no dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Feeds `bytes` split at `cuts` into a decoder for `T`; every decoded
    /// frame must re-encode to bytes that decode to the same frame. Returns
    /// how many frames decoded. Mirrors `fuzz/fuzz_targets/frame_decoder.rs`.
    fn check_property<T>(bytes: &[u8], cuts: &[usize], max: usize) -> usize
    where
        T: serde::de::DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
    {
        let mut d = FrameDecoder::new(max);
        let mut decoded = 0;
        let mut start = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|c| (*c).min(bytes.len())).collect();
        ends.sort_unstable();
        ends.push(bytes.len());
        for end in ends {
            d.push(&bytes[start..end]);
            start = end;
            loop {
                match d.next::<T>() {
                    Ok(Some(frame)) => {
                        decoded += 1;
                        let again = encode(&frame, usize::MAX).unwrap();
                        let mut d2 = FrameDecoder::new(usize::MAX);
                        d2.push(&again);
                        assert_eq!(d2.next::<T>().unwrap().as_ref(), Some(&frame));
                        d2.finish().unwrap();
                    }
                    Ok(None) => break,
                    Err(e) => {
                        assert_eq!(d.next::<T>(), Err(FrameError::Poisoned), "{e}");
                        return decoded;
                    }
                }
            }
        }
        let _ = d.finish();
        decoded
    }

    fn random_input(rng: &mut XorShift, valid: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..1 + rng.below(3) {
            match rng.below(4) {
                // Pure noise, sometimes behind a small plausible length.
                0 => {
                    let n = rng.below(64);
                    if rng.below(2) == 0 {
                        out.extend_from_slice(&(n as u32).to_be_bytes());
                    }
                    out.extend((0..n).map(|_| rng.next() as u8));
                }
                // A valid frame, whole.
                1 => out.extend_from_slice(&valid[rng.below(valid.len())]),
                // A valid frame with a few bytes flipped.
                _ => {
                    let mut f = valid[rng.below(valid.len())].clone();
                    for _ in 0..1 + rng.below(3) {
                        let i = rng.below(f.len());
                        f[i] ^= 1 << rng.below(8);
                    }
                    out.extend(f);
                }
            }
        }
        out
    }

    #[test]
    fn random_bytes_never_panic_and_decoded_frames_round_trip() {
        let mut valid: Vec<Vec<u8>> = [hello(), send("a"), send("héllo \"q\"")]
            .iter()
            .map(|f| encode(f, DEFAULT_MAX_FRAME).unwrap())
            .collect();
        for f in [
            ServerFrame::Event(crate::AgentEvent::TextDelta { text: "hi".into() }),
            ServerFrame::Error {
                code: ErrorCode::Unauthorized,
                message: "no".into(),
            },
        ] {
            valid.push(encode(&f, DEFAULT_MAX_FRAME).unwrap());
        }
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut client_frames, mut server_frames) = (0, 0);
        for _ in 0..4000 {
            let bytes = random_input(&mut rng, &valid);
            let cuts: Vec<usize> = (0..rng.below(4))
                .map(|_| rng.below(bytes.len() + 1))
                .collect();
            let max = if rng.below(8) == 0 {
                16
            } else {
                DEFAULT_MAX_FRAME
            };
            client_frames += check_property::<ClientFrame>(&bytes, &cuts, max);
            server_frames += check_property::<ServerFrame>(&bytes, &cuts, max);
        }
        // The generator reaches the decoding paths, not only the error ones.
        assert!(client_frames > 100, "{client_frames}");
        assert!(server_frames > 100, "{server_frames}");
    }
}
