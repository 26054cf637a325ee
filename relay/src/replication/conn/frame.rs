//! Framing of the bytes the server sends, and the CopyData payloads of streaming replication.
//!
//! Everything here reads external bytes, so nothing panics and nothing indexes unchecked: a
//! frame is split off the input only after its header was read and its declared length checked
//! (at least 4, at most [`MAX_MESSAGE_LEN`]); an incomplete frame is `Ok(None)`, never an error,
//! so that the caller can read more and try again. A complete frame is handed to
//! `postgres_protocol`'s parser where it knows the tag; CopyBothResponse (`'W'`), which it does
//! not know, and the replication payloads inside CopyData are decoded here.

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;

use super::error::{DbError, ReplicationError};
use crate::replication::Lsn;

/// Tag byte plus the Int32 length.
const HEADER_LEN: usize = 5;

/// The largest length field accepted. Postgres builds each outgoing message in a `StringInfo`,
/// which cannot exceed `MaxAllocSize` (1 GiB - 1), so a 1 GiB message plus slack for the length
/// field itself is more than any server sends; a larger length is corruption, and rejecting it
/// keeps a bad header from making us buffer gigabytes.
pub const MAX_MESSAGE_LEN: usize = (1 << 30) + 64;

/// How much buffer to reserve at most in advance of a large frame's bytes arriving: the buffer
/// grows with the data actually received, not with what a header claims.
const MAX_RESERVE_AHEAD: usize = 1 << 20;

/// CopyBothResponse, which `postgres_protocol::message::backend` does not know.
pub(crate) const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// One complete, still undecoded backend message: header included, so that
/// `Message::parse` can take it as it is.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) tag: u8,
    /// Position of the frame's first byte in all bytes received on the connection.
    pub(crate) offset: u64,
    bytes: BytesMut,
}

impl Frame {
    /// The message body after the 5-byte header (a zero-copy view).
    pub(crate) fn into_body(self) -> Bytes {
        let bytes = self.bytes.freeze();
        // The splitter only builds frames of at least HEADER_LEN bytes; `get` keeps this total.
        match bytes.get(HEADER_LEN..) {
            Some(_) => bytes.slice(HEADER_LEN..),
            None => Bytes::new(),
        }
    }

    /// Decodes the frame with `postgres_protocol` (any tag but `'W'`).
    pub(crate) fn parse(mut self) -> Result<Message, ReplicationError> {
        let (tag, offset) = (self.tag, self.offset);
        match Message::parse(&mut self.bytes) {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(ReplicationError::protocol(
                format!("message {} is shorter than its header says", tag_name(tag)),
                Some(offset),
            )),
            Err(e) => Err(ReplicationError::protocol(
                format!("malformed message {}: {e}", tag_name(tag)),
                Some(offset),
            )),
        }
    }

    /// Turns an `ErrorResponse`/`NoticeResponse` frame into a [`DbError`].
    pub(crate) fn into_db_error(self) -> Result<DbError, ReplicationError> {
        let offset = self.offset;
        let malformed =
            |e| ReplicationError::protocol(format!("malformed error fields: {e}"), Some(offset));
        match self.parse()? {
            Message::ErrorResponse(body) => DbError::from_fields(body.fields()).map_err(malformed),
            Message::NoticeResponse(body) => DbError::from_fields(body.fields()).map_err(malformed),
            _ => Err(ReplicationError::protocol(
                "expected an error or notice",
                Some(offset),
            )),
        }
    }
}

/// Printable name of a tag byte for error messages (the byte may be anything).
pub(crate) fn tag_name(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

/// The receive buffer of a connection, and the splitter of whole frames out of it.
///
/// All partial input lives here, which is what makes reading cancellation safe: a read that is
/// cancelled after `read_buf` appended bytes loses nothing, the next call finds them here.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    buf: BytesMut,
    consumed: u64,
}

impl FrameReader {
    pub(crate) fn new() -> FrameReader {
        FrameReader {
            buf: BytesMut::with_capacity(64 * 1024),
            consumed: 0,
        }
    }

    /// The buffer to `read_buf` into.
    pub(crate) fn buffer_mut(&mut self) -> &mut BytesMut {
        if self.buf.capacity() - self.buf.len() < 8 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        &mut self.buf
    }

    /// Bytes received but not yet returned as frames.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Position of the next frame in all bytes received so far.
    pub(crate) fn offset(&self) -> u64 {
        self.consumed
    }

    /// Splits the next complete frame off the buffer; `Ok(None)` when more bytes are needed.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, ReplicationError> {
        let Some(&[tag, l0, l1, l2, l3]) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let declared = i32::from_be_bytes([l0, l1, l2, l3]);
        let len = match usize::try_from(declared) {
            Ok(len) if (4..=MAX_MESSAGE_LEN).contains(&len) => len,
            _ => {
                return Err(ReplicationError::protocol(
                    format!(
                        "message {} declares length {declared}, outside 4..={MAX_MESSAGE_LEN}",
                        tag_name(tag)
                    ),
                    Some(self.consumed),
                ))
            }
        };
        let total = len + 1;
        if self.buf.len() < total {
            self.buf
                .reserve((total - self.buf.len()).min(MAX_RESERVE_AHEAD));
            return Ok(None);
        }
        let bytes = self.buf.split_to(total);
        let offset = self.consumed;
        self.consumed += total as u64;
        Ok(Some(Frame { tag, offset, bytes }))
    }
}

/// A message of the replication stream (the CopyData payloads of `START_REPLICATION`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: for a logical slot, one pgoutput message.
    XLogData {
        /// The WAL position this message starts at (0/0 for some pgoutput messages).
        wal_start: Lsn,
        /// The current end of WAL on the server, not the end of this message: not a position
        /// that may be confirmed.
        wal_end: Lsn,
        /// Server clock at sending, in microseconds since 2000-01-01 00:00 UTC.
        send_time: i64,
        /// The payload, split off the receive buffer without copying.
        data: Bytes,
    },
    /// The server's heartbeat. Reply with [`ReplicationStream::send_status_update`] when
    /// `reply_requested` (and regularly anyway), with positions that are durable downstream.
    ///
    /// [`ReplicationStream::send_status_update`]: super::ReplicationStream::send_status_update
    Keepalive {
        /// The current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock at sending, in microseconds since 2000-01-01 00:00 UTC.
        send_time: i64,
        /// The server disconnects after `wal_sender_timeout` without a reply.
        reply_requested: bool,
    },
}

/// What a frame received during CopyBoth means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamEvent {
    Message(ReplicationMessage),
    /// The server ended its half of the copy.
    CopyDone,
    /// The command (START_REPLICATION) completed; comes after CopyDone.
    CommandComplete,
    ReadyForQuery,
    Error(DbError),
    Notice(DbError),
    /// A ParameterStatus or anything else that carries nothing for the stream.
    Ignored,
}

/// Decodes a frame received during CopyBoth.
pub(crate) fn decode_stream_frame(frame: Frame) -> Result<StreamEvent, ReplicationError> {
    match frame.tag {
        b'd' => {
            let offset = frame.offset;
            parse_copy_data(frame.into_body(), offset).map(StreamEvent::Message)
        }
        b'E' => frame.into_db_error().map(StreamEvent::Error),
        b'N' => frame.into_db_error().map(StreamEvent::Notice),
        COPY_BOTH_RESPONSE_TAG => Err(ReplicationError::protocol(
            "CopyBothResponse while already copying",
            Some(frame.offset),
        )),
        _ => {
            let offset = frame.offset;
            match frame.parse()? {
                Message::CopyDone => Ok(StreamEvent::CopyDone),
                Message::CommandComplete(_) => Ok(StreamEvent::CommandComplete),
                Message::ReadyForQuery(_) => Ok(StreamEvent::ReadyForQuery),
                Message::ParameterStatus(_) => Ok(StreamEvent::Ignored),
                other => Err(ReplicationError::protocol(
                    format!(
                        "unexpected {} during streaming replication",
                        message_name(&other)
                    ),
                    Some(offset),
                )),
            }
        }
    }
}

/// Reads a big-endian u64 at `at`, if the bytes are there.
fn be_u64(data: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = data.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Decodes the payload of a CopyData received during streaming replication.
///
/// `'w'` XLogData: start LSN, end LSN, send time (three Int64), then the WAL data.
/// `'k'` keepalive: end LSN, send time, reply-requested byte. Bytes after a keepalive's fields
/// are tolerated, so that a future server adding a field does not break us.
pub(crate) fn parse_copy_data(
    body: Bytes,
    offset: u64,
) -> Result<ReplicationMessage, ReplicationError> {
    let short = |what: &str| {
        ReplicationError::protocol(
            format!("{what} of {} bytes is too short", body.len()),
            Some(offset),
        )
    };
    match body.first() {
        Some(b'w') => {
            let (Some(start), Some(end), Some(time)) =
                (be_u64(&body, 1), be_u64(&body, 9), be_u64(&body, 17))
            else {
                return Err(short("XLogData"));
            };
            let data = if body.len() >= 25 {
                body.slice(25..)
            } else {
                Bytes::new()
            };
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(start),
                wal_end: Lsn(end),
                send_time: time as i64,
                data,
            })
        }
        Some(b'k') => {
            let (Some(end), Some(time), Some(&reply)) =
                (be_u64(&body, 1), be_u64(&body, 9), body.get(17))
            else {
                return Err(short("primary keepalive"));
            };
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(end),
                send_time: time as i64,
                reply_requested: reply != 0,
            })
        }
        Some(&other) => Err(ReplicationError::protocol(
            format!(
                "unknown replication message {} in CopyData",
                tag_name(other)
            ),
            Some(offset),
        )),
        None => Err(ReplicationError::protocol("empty CopyData", Some(offset))),
    }
}

/// Checks a CopyBothResponse body: overall format (Int8), column count (Int16), one Int16
/// format per column.
pub(crate) fn check_copy_both_response(body: &[u8], offset: u64) -> Result<(), ReplicationError> {
    let malformed = || ReplicationError::protocol("malformed CopyBothResponse", Some(offset));
    let Some(&[hi, lo]) = body.get(1..3) else {
        return Err(malformed());
    };
    let columns = usize::from(u16::from_be_bytes([hi, lo]));
    if body.len() != 3 + 2 * columns {
        return Err(malformed());
    }
    Ok(())
}

/// Encodes a standby status update, a CopyData holding `'r'`, the written, flushed and applied
/// positions, the client clock (µs since 2000-01-01) and whether the server should reply at once.
pub(crate) fn encode_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    client_time: i64,
    reply_requested: bool,
    out: &mut BytesMut,
) {
    // Length field (4) + 'r' (1) + three LSNs (24) + clock (8) + reply byte (1).
    const LEN: i32 = 4 + 1 + 24 + 8 + 1;
    out.reserve(1 + LEN as usize);
    out.put_u8(b'd');
    out.put_i32(LEN);
    out.put_u8(b'r');
    out.put_u64(write.0);
    out.put_u64(flush.0);
    out.put_u64(apply.0);
    out.put_i64(client_time);
    out.put_u8(u8::from(reply_requested));
}

/// Microseconds between the Unix epoch and the Postgres epoch, 2000-01-01 00:00 UTC.
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The current time in the replication protocol's unit: microseconds since 2000-01-01 UTC.
pub fn pg_now_micros() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// Name of a backend message for error messages.
pub(crate) fn message_name(message: &Message) -> &'static str {
    match message {
        Message::AuthenticationOk
        | Message::AuthenticationCleartextPassword
        | Message::AuthenticationMd5Password(_)
        | Message::AuthenticationSasl(_)
        | Message::AuthenticationSaslContinue(_)
        | Message::AuthenticationSaslFinal(_)
        | Message::AuthenticationGss
        | Message::AuthenticationGssContinue(_)
        | Message::AuthenticationKerberosV5
        | Message::AuthenticationScmCredential
        | Message::AuthenticationSspi => "Authentication",
        Message::BackendKeyData(_) => "BackendKeyData",
        Message::BindComplete => "BindComplete",
        Message::CloseComplete => "CloseComplete",
        Message::CommandComplete(_) => "CommandComplete",
        Message::CopyData(_) => "CopyData",
        Message::CopyDone => "CopyDone",
        Message::CopyInResponse(_) => "CopyInResponse",
        Message::CopyOutResponse(_) => "CopyOutResponse",
        Message::DataRow(_) => "DataRow",
        Message::EmptyQueryResponse => "EmptyQueryResponse",
        Message::ErrorResponse(_) => "ErrorResponse",
        Message::NoData => "NoData",
        Message::NoticeResponse(_) => "NoticeResponse",
        Message::NotificationResponse(_) => "NotificationResponse",
        Message::ParameterDescription(_) => "ParameterDescription",
        Message::ParameterStatus(_) => "ParameterStatus",
        Message::ParseComplete => "ParseComplete",
        Message::PortalSuspended => "PortalSuspended",
        Message::ReadyForQuery(_) => "ReadyForQuery",
        Message::RowDescription(_) => "RowDescription",
        _ => "message",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A backend message: tag, length, body.
    pub(crate) fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    pub(crate) fn xlogdata(start: u64, end: u64, time: i64, data: &[u8]) -> Vec<u8> {
        let mut body = vec![b'w'];
        body.extend_from_slice(&start.to_be_bytes());
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.extend_from_slice(data);
        frame(b'd', &body)
    }

    pub(crate) fn keepalive(end: u64, time: i64, reply: bool) -> Vec<u8> {
        let mut body = vec![b'k'];
        body.extend_from_slice(&end.to_be_bytes());
        body.extend_from_slice(&time.to_be_bytes());
        body.push(u8::from(reply));
        frame(b'd', &body)
    }

    pub(crate) fn error_response(code: &str, message: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (t, v) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', code),
            (b'M', message),
        ] {
            body.push(t);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        frame(b'E', &body)
    }

    /// `err` is a protocol violation reported at input position `offset`.
    #[track_caller]
    pub(crate) fn assert_protocol_error_at(err: &ReplicationError, offset: u64) {
        match err {
            ReplicationError::Protocol {
                offset: Some(at), ..
            } if *at == offset => {}
            other => panic!("expected a protocol error at byte {offset}, got: {other}"),
        }
    }

    /// Splits and decodes everything in `reader`: the events up to the first error, and the
    /// error's text if there was one.
    fn drain(reader: &mut FrameReader, out: &mut Vec<StreamEvent>) -> Result<(), String> {
        while let Some(f) = reader.next_frame().map_err(|e| e.to_string())? {
            out.push(decode_stream_frame(f).map_err(|e| e.to_string())?);
        }
        Ok(())
    }

    fn decode_chunks(chunks: &[&[u8]]) -> (Vec<StreamEvent>, Result<(), String>) {
        let mut reader = FrameReader::new();
        let mut out = Vec::new();
        for chunk in chunks {
            reader.buffer_mut().extend_from_slice(chunk);
            if let Err(e) = drain(&mut reader, &mut out) {
                return (out, Err(e));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn xlogdata_is_decoded_and_payload_shares_the_buffer() {
        let bytes = xlogdata(0x16_B374_D848, 0x16_B374_D900, 42, b"BCDE");
        let mut reader = FrameReader::new();
        reader.buffer_mut().extend_from_slice(&bytes);
        let base = reader.buf.as_ptr();
        let f = reader.next_frame().unwrap().unwrap();
        assert_eq!(f.offset, 0);
        match decode_stream_frame(f).unwrap() {
            StreamEvent::Message(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                send_time,
                data,
            }) => {
                assert_eq!(wal_start, Lsn(0x16_B374_D848));
                assert_eq!(wal_end, Lsn(0x16_B374_D900));
                assert_eq!(send_time, 42);
                assert_eq!(&data[..], b"BCDE");
                // Zero-copy: the payload points into the receive buffer, past the frame header
                // (5 bytes) and the XLogData header (25 bytes).
                assert_eq!(data.as_ptr(), base.wrapping_add(30));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.buffered(), 0);
        assert_eq!(reader.offset(), bytes.len() as u64);
    }

    #[test]
    fn keepalive_is_decoded() {
        let (events, end) = decode_chunks(&[&keepalive(7, -1, true), &keepalive(8, 2, false)]);
        end.unwrap();
        assert_eq!(
            events,
            vec![
                StreamEvent::Message(ReplicationMessage::Keepalive {
                    wal_end: Lsn(7),
                    send_time: -1,
                    reply_requested: true
                }),
                StreamEvent::Message(ReplicationMessage::Keepalive {
                    wal_end: Lsn(8),
                    send_time: 2,
                    reply_requested: false
                }),
            ]
        );
    }

    #[test]
    fn error_response_is_typed() {
        let (events, end) = decode_chunks(&[&error_response("55006", "slot is active")]);
        end.unwrap();
        let [StreamEvent::Error(e)] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(e.code, "55006");
        assert_eq!(e.severity, "ERROR");
        assert_eq!(e.message, "slot is active");
        assert_eq!(e.detail, None);
    }

    #[test]
    fn copy_done_command_complete_ready() {
        let mut bytes = frame(b'c', b"");
        bytes.extend(frame(b'C', b"COPY 0\0"));
        bytes.extend(frame(b'Z', b"I"));
        let (events, end) = decode_chunks(&[&bytes]);
        end.unwrap();
        assert_eq!(
            events,
            vec![
                StreamEvent::CopyDone,
                StreamEvent::CommandComplete,
                StreamEvent::ReadyForQuery
            ]
        );
    }

    #[test]
    fn incomplete_frames_wait_for_more() {
        let bytes = xlogdata(1, 2, 3, b"payload");
        for cut in 0..bytes.len() {
            let mut reader = FrameReader::new();
            reader.buffer_mut().extend_from_slice(&bytes[..cut]);
            assert!(reader.next_frame().unwrap().is_none(), "cut at {cut}");
            assert_eq!(reader.buffered(), cut);
        }
    }

    #[test]
    fn bad_lengths_are_rejected_without_allocating() {
        for len in [i32::MIN, -1, 0, 3, (MAX_MESSAGE_LEN + 1) as i32, i32::MAX] {
            let mut reader = FrameReader::new();
            reader.buffer_mut().put_u8(b'd');
            reader.buffer_mut().put_i32(len);
            let err = reader.next_frame().unwrap_err();
            assert_protocol_error_at(&err, 0);
        }
        // The largest sane length waits for its bytes and reserves only a bounded amount.
        let mut reader = FrameReader::new();
        reader.buffer_mut().put_u8(b'd');
        reader.buffer_mut().put_i32(MAX_MESSAGE_LEN as i32);
        assert!(reader.next_frame().unwrap().is_none());
        assert!(reader.buf.capacity() < 4 * MAX_RESERVE_AHEAD);
    }

    #[test]
    fn truncated_and_unknown_copy_data_are_protocol_errors() {
        for body in [&b""[..], b"w", &[b'w'; 24], b"k\0\0\0\0\0\0\0\0", b"x"] {
            let err = parse_copy_data(Bytes::copy_from_slice(body), 9).unwrap_err();
            assert_protocol_error_at(&err, 9);
        }
        // An XLogData with an empty payload is fine.
        let ok = parse_copy_data(Bytes::copy_from_slice(&[b'w'; 25]), 0).unwrap();
        assert!(matches!(ok, ReplicationMessage::XLogData { data, .. } if data.is_empty()));
    }

    #[test]
    fn unexpected_messages_during_streaming_are_errors() {
        let (_, end) = decode_chunks(&[&frame(b'W', b"\0\0\0")]);
        assert!(end.unwrap_err().contains("CopyBothResponse"));
        let (_, end) = decode_chunks(&[&frame(b'D', b"\0\0")]);
        assert!(end.unwrap_err().contains("DataRow"));
        let (_, end) = decode_chunks(&[&frame(0xff, b"")]);
        assert!(end.unwrap_err().contains("0xff"));
    }

    #[test]
    fn copy_both_response_is_checked() {
        check_copy_both_response(b"\0\0\0", 0).unwrap();
        check_copy_both_response(b"\0\0\x01\0\0", 0).unwrap();
        for bad in [&b""[..], b"\0", b"\0\0\x01", b"\0\0\0\0"] {
            assert!(check_copy_both_response(bad, 0).is_err());
        }
    }

    #[test]
    fn status_update_is_byte_exact() {
        let mut out = BytesMut::new();
        encode_status_update(
            Lsn(0x0000_0001_0000_0002),
            Lsn(0x0000_0003_0000_0004),
            Lsn(0x0000_0005_0000_0006),
            0x0102_0304_0506_0708,
            true,
            &mut out,
        );
        #[rustfmt::skip]
        let expected: &[u8] = &[
            b'd', 0, 0, 0, 38,
            b'r',
            0, 0, 0, 1, 0, 0, 0, 2,
            0, 0, 0, 3, 0, 0, 0, 4,
            0, 0, 0, 5, 0, 0, 0, 6,
            1, 2, 3, 4, 5, 6, 7, 8,
            1,
        ];
        assert_eq!(&out[..], expected);
        out.clear();
        encode_status_update(Lsn(0), Lsn(0), Lsn(0), 0, false, &mut out);
        assert_eq!(out.len(), 39);
        assert_eq!(out.last(), Some(&0));
    }

    #[test]
    fn pg_epoch_is_2000() {
        // 2026 is about 26 years after the Postgres epoch.
        let years = pg_now_micros() / 1_000_000 / 86_400 / 365;
        assert!((20..100).contains(&years), "{years}");
    }

    fn stream_fixture() -> impl Strategy<Value = Vec<u8>> {
        let one = prop_oneof![
            (
                any::<u64>(),
                any::<u64>(),
                any::<i64>(),
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(s, e, t, d)| xlogdata(s, e, t, &d)),
            (any::<u64>(), any::<i64>(), any::<bool>()).prop_map(|(e, t, r)| keepalive(e, t, r)),
            ("[0-9A-Z]{5}", "[ -~]{0,20}").prop_map(|(c, m)| error_response(&c, &m)),
            Just(frame(b'c', b"")),
            Just(frame(b'C', b"COPY 0\0")),
        ];
        proptest::collection::vec(one, 0..8).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_chunks(&[&bytes]);
        }

        #[test]
        fn never_panics_on_mutated_valid_streams(
            mut bytes in stream_fixture(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        ) {
            for (at, value) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = value;
                }
            }
            let _ = decode_chunks(&[&bytes]);
        }

        #[test]
        fn split_anywhere_equals_whole(bytes in stream_fixture(), cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
            let whole = decode_chunks(&[&bytes]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in cuts {
                chunks.push(&bytes[start..cut]);
                start = cut;
            }
            chunks.push(&bytes[start..]);
            prop_assert_eq!(decode_chunks(&chunks), whole);
        }

        #[test]
        fn split_arbitrary_bytes_anywhere_equals_whole(bytes in proptest::collection::vec(any::<u8>(), 0..256), cut in any::<usize>()) {
            let cut = cut % (bytes.len() + 1);
            let whole = decode_chunks(&[&bytes]);
            let split = decode_chunks(&[&bytes[..cut], &bytes[cut..]]);
            prop_assert_eq!(split, whole);
        }
    }
}
