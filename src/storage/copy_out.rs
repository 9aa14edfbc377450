//! PostgreSQL's binary `COPY ... TO STDOUT` format, read back row by row. Timeline reads
//! use it: a binary row is a length-prefixed field after another, which the server
//! decodes in a fraction of what a query's row costs it
//! (docs/decisions/0013-timeline-read-with-binary-copy.md).

use bytes::{Buf, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::copy::{HEADER, PG_EPOCH_OFFSET_MICROS};
use crate::error::Error;

/// The binary COPY data of a statement, fed in as it arrives, handed out as whole rows.
#[derive(Debug, Default)]
pub struct CopyDecoder {
    buf: BytesMut,
    header_read: bool,
    ended: bool,
}

/// The fields of one row, read in order.
#[derive(Debug)]
pub struct CopyRow {
    data: Bytes,
}

fn malformed(what: &str) -> Error {
    Error::internal(anyhow::anyhow!("malformed binary COPY data: {what}"))
}

impl CopyDecoder {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole row buffered, if any.
    pub fn next_row(&mut self) -> Result<Option<CopyRow>, Error> {
        if !self.header_read {
            // Signature (11 bytes), flags (4), the extension's length (4), the extension.
            if self.buf.len() < HEADER.len() {
                return Ok(None);
            }
            if self.buf[..11] != HEADER[..11] {
                return Err(malformed("no PGCOPY signature"));
            }
            let extension =
                u32::from_be_bytes([self.buf[15], self.buf[16], self.buf[17], self.buf[18]])
                    as usize;
            if self.buf.len() < HEADER.len() + extension {
                return Ok(None);
            }
            self.buf.advance(HEADER.len() + extension);
            self.header_read = true;
        }
        if self.ended || self.buf.len() < 2 {
            return Ok(None);
        }
        let fields = i16::from_be_bytes([self.buf[0], self.buf[1]]);
        if fields == -1 {
            self.ended = true;
            self.buf.advance(2);
            return Ok(None);
        }
        let fields = usize::try_from(fields).map_err(|_| malformed("a negative field count"))?;
        let mut at = 2;
        for _ in 0..fields {
            let Some(prefix) = self.buf.get(at..at + 4) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
            at += 4 + usize::try_from(len).unwrap_or(0);
            if self.buf.len() < at {
                return Ok(None);
            }
        }
        let mut data = self.buf.split_to(at).freeze();
        data.advance(2);
        Ok(Some(CopyRow { data }))
    }

    /// Whether the end-of-data marker was read.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

impl CopyRow {
    /// The next field's bytes; `None` for NULL.
    fn field(&mut self) -> Result<Option<Bytes>, Error> {
        if self.data.len() < 4 {
            return Err(malformed("a row with fewer fields than read"));
        }
        let len = self.data.get_i32();
        match usize::try_from(len) {
            Ok(len) => Ok(Some(self.data.split_to(len))),
            Err(_) => Ok(None),
        }
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<Option<[u8; N]>, Error> {
        self.field()?
            .map(|bytes| <[u8; N]>::try_from(bytes.as_ref()).map_err(|_| malformed(what)))
            .transpose()
    }

    fn required<T>(value: Option<T>, what: &str) -> Result<T, Error> {
        value.ok_or_else(|| malformed(&format!("{what} is NULL")))
    }

    pub fn bool(&mut self) -> Result<bool, Error> {
        let [b] = Self::required(self.fixed::<1>("bool")?, "bool")?;
        Ok(b != 0)
    }

    pub fn uuid(&mut self) -> Result<Uuid, Error> {
        let bytes = Self::required(self.fixed::<16>("uuid")?, "uuid")?;
        Ok(Uuid::from_bytes(bytes))
    }

    pub fn optional_timestamptz(&mut self) -> Result<Option<DateTime<Utc>>, Error> {
        self.fixed::<8>("timestamptz")?
            .map(|bytes| {
                let micros = i64::from_be_bytes(bytes).saturating_add(PG_EPOCH_OFFSET_MICROS);
                DateTime::from_timestamp_micros(micros).ok_or_else(|| malformed("timestamptz"))
            })
            .transpose()
    }

    pub fn timestamptz(&mut self) -> Result<DateTime<Utc>, Error> {
        let value = self.optional_timestamptz()?;
        Self::required(value, "timestamptz")
    }

    pub fn text(&mut self) -> Result<String, Error> {
        let bytes = Self::required(self.field()?, "text")?;
        String::from_utf8(bytes.to_vec()).map_err(|_| malformed("text"))
    }

    pub fn optional_float8(&mut self) -> Result<Option<f64>, Error> {
        Ok(self.fixed::<8>("float8")?.map(f64::from_be_bytes))
    }

    /// A jsonb field (a version byte, 1, then the JSON text).
    pub fn optional_jsonb(&mut self) -> Result<Option<serde_json::Value>, Error> {
        self.field()?
            .map(|bytes| match bytes.split_first() {
                Some((1, json)) => serde_json::from_slice(json).map_err(|_| malformed("jsonb")),
                _ => Err(malformed("jsonb version")),
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::copy::CopyEncoder;

    #[test]
    fn rows_written_by_the_encoder_read_back_however_the_data_is_split() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        let mut rows = CopyEncoder::new(256);
        rows.row(4).uuid(id).timestamptz(at).text("positive").null();
        rows.row(4)
            .uuid(id)
            .timestamptz(at)
            .text("neutral")
            .optional_float8(Some(0.25));
        let data = rows.finish();
        for split in [1, 2, 3, 7, 19, 20, data.len()] {
            let mut decoder = CopyDecoder::default();
            let mut read = Vec::new();
            for piece in data.chunks(split) {
                decoder.push(piece);
                while let Some(mut row) = decoder.next_row().unwrap() {
                    read.push((
                        row.uuid().unwrap(),
                        row.timestamptz().unwrap(),
                        row.text().unwrap(),
                        row.optional_float8().unwrap(),
                    ));
                }
            }
            assert!(decoder.ended(), "split {split}");
            assert_eq!(
                read,
                vec![
                    (id, at, "positive".to_owned(), None),
                    (id, at, "neutral".to_owned(), Some(0.25)),
                ],
                "split {split}"
            );
        }
    }

    #[test]
    fn data_without_the_signature_is_refused() {
        let mut decoder = CopyDecoder::default();
        decoder.push(b"NOTCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\0\0");
        assert!(decoder.next_row().is_err());
    }
}
