//! Fuzz the PMI wire decoder: any bytes must give a message, "incomplete" or an error; never a
//! panic, never a message longer than the input or the limit, and every decoded message must
//! survive an encode/decode round trip.
#![no_main]

use cmpirun_pmi::wire::{Decoded, decode};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Decoded::Message(msg, used)) = decode(rest, MAX) {
        assert!(used > 0 && used <= rest.len() && used <= MAX);
        let again = msg.encode();
        if let Ok(Decoded::Message(back, n)) = decode(&again, usize::MAX) {
            assert_eq!(n, again.len());
            assert_eq!(back.cmd, msg.cmd);
        }
        rest = &rest[used..];
    }
});
