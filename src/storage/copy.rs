//! PostgreSQL's binary `COPY ... FROM STDIN` format, written row by row into a buffer.
//! Streams use it to load their items at the speed of COPY, inside their transaction.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The binary COPY header: signature, flags, header extension length.
pub const HEADER: [u8; 19] = *b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The end-of-data marker.
pub const TRAILER: [u8; 2] = (-1_i16).to_be_bytes();

/// A buffer of binary COPY data: the header, rows, and (on [`CopyEncoder::finish`]) the
/// trailer. Sent to the server in pieces with [`CopyEncoder::take`].
#[derive(Debug)]
pub struct CopyEncoder {
    buf: Vec<u8>,
}

impl CopyEncoder {
    pub fn new(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(&HEADER);
        Self { buf }
    }

    /// A buffer for rows only: the header and trailer are sent apart from them.
    pub fn rows(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// The bytes written since the buffer was `start` long.
    pub fn since(&self, start: usize) -> &[u8] {
        self.buf.get(start..).unwrap_or_default()
    }

    /// Empties the buffer, header included: for encoding values on their own.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes the bytes written so far, leaving the buffer empty (and its capacity).
    pub fn take(&mut self) -> Vec<u8> {
        let capacity = self.buf.capacity();
        std::mem::replace(&mut self.buf, Vec::with_capacity(capacity))
    }

    /// Starts a row of `fields` columns.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.buf.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // COPY fields are limited far below i32::MAX by the message size.
        let length = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&length.to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1_i32).to_be_bytes());
        self
    }

    pub fn uuid(&mut self, value: Uuid) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn int8(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub fn timestamptz(&mut self, value: DateTime<Utc>) -> &mut Self {
        let micros = value.timestamp_micros() - PG_EPOCH_OFFSET_MICROS;
        self.field(&micros.to_be_bytes())
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn optional_float8(&mut self, value: Option<f64>) -> &mut Self {
        match value {
            Some(value) => self.field(&value.to_be_bytes()),
            None => self.null(),
        }
    }

    /// A `jsonb` value serialized straight into the buffer.
    pub fn jsonb_of(
        &mut self,
        value: &impl serde::Serialize,
    ) -> Result<&mut Self, serde_json::Error> {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0_i32.to_be_bytes());
        self.buf.push(1);
        if let Err(error) = serde_json::to_writer(&mut self.buf, value) {
            self.buf.truncate(start);
            return Err(error);
        }
        let length = i32::try_from(self.buf.len() - start - 4).unwrap_or(i32::MAX);
        self.buf[start..start + 4].copy_from_slice(&length.to_be_bytes());
        Ok(self)
    }

    /// Appends the end-of-data marker and returns the remaining bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&TRAILER);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_row_and_trailer_follow_the_format() {
        let mut encoder = CopyEncoder::new(64);
        let epoch = DateTime::from_timestamp(946_684_800, 0).unwrap_or_default();
        encoder
            .row(3)
            .timestamptz(epoch)
            .text("ab")
            .optional_float8(None);
        let bytes = encoder.finish();
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend_from_slice(&[0, 3]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn jsonb_is_length_prefixed_with_a_version_byte() {
        let mut encoder = CopyEncoder::new(64);
        let start = encoder.len();
        encoder
            .jsonb_of(&std::collections::BTreeMap::from([("k", "v")]))
            .unwrap_or_else(|_| unreachable!());
        let bytes = encoder.take();
        let written = &bytes[start..];
        let json = br#"{"k":"v"}"#;
        assert_eq!(
            &written[..4],
            &i32::try_from(json.len() + 1)
                .unwrap_or_default()
                .to_be_bytes()
        );
        assert_eq!(written[4], 1);
        assert_eq!(&written[5..], json);
    }
}
