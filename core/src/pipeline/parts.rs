//! The hand-off from the synchronous encoding thread to the asynchronous uploader: fixed-size
//! parts over a bounded channel, so memory is `part_size × (channel + in flight + 1)`.

use std::io::{self, Write};

use bytes::Bytes;
use tokio::sync::mpsc;

pub struct PartWriter {
    buf: Vec<u8>,
    part_size: usize,
    tx: mpsc::Sender<Bytes>,
    sent: usize,
}

impl PartWriter {
    pub fn new(tx: mpsc::Sender<Bytes>, part_size: usize) -> Self {
        PartWriter {
            buf: Vec::with_capacity(part_size),
            part_size,
            tx,
            sent: 0,
        }
    }

    fn send(&mut self) -> io::Result<()> {
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size));
        self.sent += 1;
        self.tx
            .blocking_send(Bytes::from(part))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, UploadStopped))
    }

    /// Sends the last, possibly short, part.
    pub fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() || self.sent == 0 {
            self.send()?;
        }
        Ok(())
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.part_size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.part_size {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The uploader stopped taking parts; its own error says why.
#[derive(Debug, thiserror::Error)]
#[error("the upload stopped")]
pub struct UploadStopped;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_fixed_size_with_a_short_tail() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut w = PartWriter::new(tx, 10);
        w.write_all(&[7u8; 25]).unwrap();
        w.finish().unwrap();
        let mut sizes = Vec::new();
        while let Ok(p) = rx.try_recv() {
            sizes.push(p.len());
        }
        assert_eq!(sizes, vec![10, 10, 5]);
    }

    #[test]
    fn a_closed_uploader_stops_the_writer() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut w = PartWriter::new(tx, 4);
        let err = w.write_all(&[0u8; 8]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
