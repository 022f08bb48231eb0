//! Arbitrary bytes, split at arbitrary points, into `FrameDecoder` for both
//! directions: no panic, and every decoded frame re-encodes to bytes that
//! decode to the same frame. The same property runs in CI over seeded
//! pseudo-random inputs (`crates/proto/src/frame.rs`, tests).
//!
//! Input layout: byte 0 picks the size limit, byte 1 the number of cuts
//! (0-7), the next 2 bytes per cut are cut offsets, the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use openpista_proto::frame::{self, DEFAULT_MAX_FRAME, FrameDecoder, FrameError};
use openpista_proto::wire::{ClientFrame, ServerFrame};
use serde::Serialize;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    let Some((&limit, rest)) = data.split_first() else {
        return;
    };
    let Some((&ncuts, rest)) = rest.split_first() else {
        return;
    };
    let ncuts = usize::from(ncuts % 8);
    let (cut_bytes, stream) = rest.split_at((ncuts * 2).min(rest.len()));
    let mut cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| {
            let v = usize::from(c[0]) << 8 | usize::from(*c.get(1).unwrap_or(&0));
            v % (stream.len() + 1)
        })
        .collect();
    cuts.sort_unstable();
    cuts.push(stream.len());
    let max = if limit % 4 == 0 {
        32
    } else {
        DEFAULT_MAX_FRAME
    };
    check::<ClientFrame>(stream, &cuts, max);
    check::<ServerFrame>(stream, &cuts, max);
});

fn check<T>(stream: &[u8], ends: &[usize], max: usize)
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let mut d = FrameDecoder::new(max);
    let mut start = 0;
    for &end in ends {
        d.push(&stream[start..end]);
        start = end;
        loop {
            match d.next::<T>() {
                Ok(Some(frame)) => {
                    let bytes = frame::encode(&frame, usize::MAX).expect("a decoded frame encodes");
                    let mut again = FrameDecoder::new(usize::MAX);
                    again.push(&bytes);
                    let back = again.next::<T>().expect("re-encoded frame decodes");
                    assert_eq!(back.as_ref(), Some(&frame));
                    again.finish().expect("nothing left over");
                }
                Ok(None) => break,
                Err(_) => {
                    assert_eq!(d.next::<T>(), Err(FrameError::Poisoned));
                    return;
                }
            }
        }
    }
    let _ = d.finish();
}
