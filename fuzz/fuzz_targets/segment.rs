//! Change segments as read back from the repository (after decryption): any bytes must give
//! frames or an error, never a panic or an allocation the input does not pay for; every
//! pgoutput message that parses must turn into SQL or an error.
#![no_main]

use dr_continuous::decode::{parse, Frame, Frames, Replayer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frames = Frames::new(data);
    let mut replayer = Replayer::default();
    while let Ok(Some(frame)) = frames.next_frame() {
        if let Frame::Message { data, .. } = frame {
            if let Ok(message) = parse(&data) {
                let _ = replayer.sql(&message);
            }
        }
    }
});
