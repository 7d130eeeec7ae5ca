//! Turning a decompressed request body into candidate events. Whole-body
//! problems (not UTF-8 JSON, too many events, no CSV header) fail the request;
//! problems with one event (one NDJSON line, one CSV row, one array element)
//! become that event's error and the rest go on.

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::config::Limits;
use super::raw;

/// Body formats, chosen by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Ndjson,
    Csv,
}

impl BodyFormat {
    /// Maps a `Content-Type` header. A missing header means JSON. A charset,
    /// when given, must be UTF-8.
    pub fn from_content_type(ct: Option<&str>) -> Result<BodyFormat, String> {
        let Some(ct) = ct else {
            return Ok(BodyFormat::Json);
        };
        let mut parts = ct.split(';');
        let mime = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        for param in parts {
            let (k, v) = param.split_once('=').unwrap_or((param, ""));
            if k.trim().eq_ignore_ascii_case("charset") {
                let v = v.trim().trim_matches('"');
                if !v.eq_ignore_ascii_case("utf-8") && !v.eq_ignore_ascii_case("utf8") {
                    return Err(format!("unsupported charset {v:?}: bodies must be UTF-8"));
                }
            }
        }
        match mime.as_str() {
            "application/json" | "text/json" => Ok(BodyFormat::Json),
            m if m.starts_with("application/") && m.ends_with("+json") => Ok(BodyFormat::Json),
            "application/x-ndjson" | "application/ndjson" | "application/jsonl"
            | "application/x-jsonlines" | "application/jsonlines" => Ok(BodyFormat::Ndjson),
            "text/csv" | "application/csv" => Ok(BodyFormat::Csv),
            _ => Err(format!(
                "unsupported media type {mime:?}: use application/json, application/x-ndjson or text/csv"
            )),
        }
    }
}

/// One event as found in the body, before validation: its raw JSON text.
#[derive(Debug)]
pub struct Candidate<'a> {
    /// 1-based line of the body where the event starts (NDJSON and CSV).
    pub line: Option<usize>,
    pub value: Result<EventText<'a>, String>,
}

/// An event's JSON text: borrowed from a JSON or NDJSON body, or built from a
/// CSV row.
#[derive(Debug)]
pub enum EventText<'a> {
    Borrowed(&'a RawValue),
    Owned(Box<RawValue>),
}

impl EventText<'_> {
    pub fn get(&self) -> &RawValue {
        match self {
            EventText::Borrowed(r) => r,
            EventText::Owned(r) => r,
        }
    }
}

/// Why the whole body is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Malformed(String),
    #[error("too many events: more than {0} in one request")]
    TooManyEvents(usize),
    #[error("empty body: no events")]
    Empty,
    #[error("CSV body has a header row but no data rows")]
    CsvHeaderOnly,
    #[error("body is JSON, but Content-Type says CSV: send it as application/json")]
    JsonAsCsv,
}

pub fn parse_body<'a>(
    format: BodyFormat,
    body: &'a [u8],
    limits: &Limits,
) -> Result<Vec<Candidate<'a>>, BodyError> {
    // A UTF-8 byte order mark (editors and some Windows tools write one)
    // is not part of the JSON text; the CSV reader skips it by itself.
    let json_text = || body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let candidates = match format {
        BodyFormat::Json => parse_json(json_text(), limits)?,
        BodyFormat::Ndjson => parse_ndjson(json_text(), limits)?,
        BodyFormat::Csv => parse_csv(body, limits)?,
    };
    if candidates.is_empty() {
        return Err(BodyError::Empty);
    }
    Ok(candidates)
}

fn too_many(n: usize, limits: &Limits) -> Result<(), BodyError> {
    if n > limits.max_events_per_request {
        Err(BodyError::TooManyEvents(limits.max_events_per_request))
    } else {
        Ok(())
    }
}

/// A single object, `{"event": {...}}`, `{"events": [...]}`, or an array. An
/// object is a wrapper only when `event`/`events` is its one key, so an event
/// that merely has a field named `event` is still an event.
///
/// The body is first checked as a whole (syntax at any depth, without
/// allocating), then split into the raw text of each event: no value tree is
/// built, and an array stops at the element past the event limit.
fn parse_json<'a>(body: &'a [u8], limits: &Limits) -> Result<Vec<Candidate<'a>>, BodyError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BodyError::Empty);
    }
    let check_whole = || -> Result<&'a RawValue, BodyError> {
        serde_json::from_slice(body)
            .map_err(|e| BodyError::Malformed(format!("body is not valid JSON: {e}")))
    };
    // An array, the batch form, is checked and split in one pass: the split
    // reads every byte an up-front check would. Its errors are reported as
    // that check words them (position in the body, and a syntax error
    // anywhere before too many events), so it runs again on the error path.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        if let Ok(text) = std::str::from_utf8(body) {
            let items = match raw::elements(text, limits.max_events_per_request) {
                Ok(items) => items,
                Err(raw::SplitError::TooMany) => {
                    check_whole()?;
                    return Err(BodyError::TooManyEvents(limits.max_events_per_request));
                }
                Err(raw::SplitError::Json(e)) => {
                    check_whole()?;
                    return Err(BodyError::Malformed(format!("body is not valid JSON: {e}")));
                }
            };
            return borrowed(items, limits);
        }
    }
    let whole = check_whole()?;
    let split = |text: &'a str| match raw::elements(text, limits.max_events_per_request) {
        Ok(items) => Ok(items),
        Err(raw::SplitError::TooMany) => {
            Err(BodyError::TooManyEvents(limits.max_events_per_request))
        }
        Err(raw::SplitError::Json(e)) => {
            Err(BodyError::Malformed(format!("body is not valid JSON: {e}")))
        }
    };
    let text = whole.get();
    let items: Vec<&RawValue> = if text.starts_with('[') {
        split(text)?
    } else if text.starts_with('{') {
        // Two fields are enough to tell a wrapper from an event; an object
        // whose first key is plainly something else is an event, without
        // another pass over it.
        let wrapped = if !raw::first_key_may_be(text, &["event", "events"]) {
            None
        } else {
            match raw::fields(text, 2) {
                Ok(raw::Fields::Object(f)) if f.len() == 1 => {
                    let (k, v) = &f[0];
                    match k.as_ref() {
                        "events" => Some(Ok(*v)),
                        "event" => Some(Err(*v)),
                        _ => None,
                    }
                }
                _ => None,
            }
        };
        match wrapped {
            Some(Ok(list)) if list.get().starts_with('[') => split(list.get())?,
            Some(Ok(_)) => {
                return Err(BodyError::Malformed(
                    "\"events\" must be an array of event objects".into(),
                ))
            }
            Some(Err(one)) => vec![one],
            None => vec![whole],
        }
    } else {
        return Err(BodyError::Malformed(
            "body must be a JSON object or an array of objects".into(),
        ));
    };
    borrowed(items, limits)
}

fn borrowed<'a>(
    items: Vec<&'a RawValue>,
    limits: &Limits,
) -> Result<Vec<Candidate<'a>>, BodyError> {
    too_many(items.len(), limits)?;
    Ok(items
        .into_iter()
        .map(|v| Candidate {
            line: None,
            value: Ok(EventText::Borrowed(v)),
        })
        .collect())
}

/// One JSON value per line; blank lines are skipped. Each line stands alone.
fn parse_ndjson<'a>(body: &'a [u8], limits: &Limits) -> Result<Vec<Candidate<'a>>, BodyError> {
    let mut out = Vec::new();
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        too_many(out.len() + 1, limits)?;
        let value = match std::str::from_utf8(raw) {
            Err(e) => Err(format!("line is not valid UTF-8: {e}")),
            Ok(text) => serde_json::from_str::<&RawValue>(text)
                .map(EventText::Borrowed)
                .map_err(|e| format!("invalid JSON: {e}")),
        };
        out.push(Candidate {
            line: Some(i + 1),
            value,
        });
    }
    Ok(out)
}

/// The header row names the fields. Cells are strings, except `timestamp`
/// when it is a number (epoch), `metadata` (a JSON object), and
/// `metadata.<key>` columns, which become keys of `metadata`. An empty cell is
/// an absent field, so defaults apply. Lines are physical lines of the body,
/// whatever the line ending (LF, CRLF or CR), blank lines included.
fn parse_csv<'a>(body: &'a [u8], limits: &Limits) -> Result<Vec<Candidate<'a>>, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{' | b'['))
        && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
    {
        return Err(BodyError::JsonAsCsv);
    }
    let scan = scan_csv(body);
    if let Some(at) = scan.too_wide {
        return Err(BodyError::Malformed(format!(
            "CSV record on line {} has more than {MAX_CSV_FIELDS} fields",
            LineCounter::new(body).line_at(at)
        )));
    }
    let open_quote = scan.open_quote;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(body);
    let headers = reader
        .byte_headers()
        .map_err(|e| BodyError::Malformed(format!("CSV header row: {e}")))?
        .clone();
    let headers: Vec<String> = headers
        .iter()
        .map(|h| {
            std::str::from_utf8(h)
                .map(|s| s.trim().to_string())
                .map_err(|_| BodyError::Malformed("CSV header row is not valid UTF-8".into()))
        })
        .collect::<Result<_, _>>()?;
    if headers.iter().all(String::is_empty) {
        return Err(BodyError::Malformed(
            "CSV header row names no fields".into(),
        ));
    }
    if open_quote == Some(0) {
        return Err(BodyError::Malformed(
            "CSV header row has a quote that is never closed".into(),
        ));
    }
    let mut lines = LineCounter::new(body);
    let mut out = Vec::new();
    let mut row = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {
                too_many(out.len() + 1, limits)?;
                // The reader's position can be that of blank lines it
                // skipped before the row.
                let mut start = row.position().map_or(0, |p| p.byte() as usize);
                while matches!(body.get(start), Some(b'\r' | b'\n')) {
                    start += 1;
                }
                let line = Some(lines.line_at(start));
                // The reader ends a quoted field at the end of the body
                // without complaint; a quote still open there would turn
                // every later row into this one's text.
                let end = reader.position().byte() as usize;
                let value = if open_quote.is_some_and(|q| (start..end).contains(&q)) {
                    Err(format!(
                        "CSV: a quoted field opened on line {} is never closed",
                        lines.line_at(open_quote.unwrap_or(start))
                    ))
                } else {
                    csv_row(&headers, &row).and_then(|v| {
                        serde_json::value::to_raw_value(&v)
                            .map(EventText::Owned)
                            .map_err(|e| e.to_string())
                    })
                };
                out.push(Candidate { line, value });
            }
            Err(e) => {
                // A row the CSV reader cannot parse ends the body; rows
                // before it stand.
                too_many(out.len() + 1, limits)?;
                let line = e.position().map(|p| lines.line_at(p.byte() as usize));
                out.push(Candidate {
                    line,
                    value: Err(format!("CSV: {e}")),
                });
                break;
            }
        }
    }
    if out.is_empty() {
        return Err(BodyError::CsvHeaderOnly);
    }
    Ok(out)
}

/// Columns a CSV record may have. The reader keeps an offset per cell, so a
/// row of millions of empty cells would cost several times its bytes.
pub const MAX_CSV_FIELDS: usize = 10_000;

/// What a pass over a CSV body finds before the reader sees it: where the
/// quoted field still open at the end of the body starts, and where the first
/// record with more than [`MAX_CSV_FIELDS`] fields starts. Follows the
/// reader's rules: a quote opens a field only at its start, and `""` inside a
/// quoted field is a literal quote.
struct CsvScan {
    open_quote: Option<usize>,
    too_wide: Option<usize>,
}

fn scan_csv(body: &[u8]) -> CsvScan {
    let (mut at_field_start, mut open) = (true, None);
    let (mut record_start, mut fields, mut too_wide) = (0, 1usize, None);
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        match open {
            Some(_) if b == b'"' => {
                if body.get(i + 1) == Some(&b'"') {
                    i += 1;
                } else {
                    open = None;
                }
            }
            Some(_) => {}
            None if b == b'"' && at_field_start => open = Some(i),
            None => {
                at_field_start = matches!(b, b',' | b'\n' | b'\r');
                match b {
                    b',' => fields += 1,
                    b'\n' | b'\r' => {
                        fields = 1;
                        record_start = i + 1;
                    }
                    _ => {}
                }
                if fields > MAX_CSV_FIELDS && too_wide.is_none() {
                    too_wide = Some(record_start);
                }
            }
        }
        if open.is_some() || b == b'"' {
            at_field_start = false;
        }
        i += 1;
    }
    CsvScan {
        open_quote: open,
        too_wide,
    }
}

/// Physical line numbers (1-based) of byte offsets, counting LF, CRLF and a
/// lone CR each as one line end. Offsets must be asked in rising order.
struct LineCounter<'a> {
    body: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> LineCounter<'a> {
    fn new(body: &'a [u8]) -> Self {
        LineCounter {
            body,
            pos: 0,
            line: 1,
        }
    }

    fn line_at(&mut self, offset: usize) -> usize {
        let offset = offset.min(self.body.len());
        while self.pos < offset {
            match self.body[self.pos] {
                b'\n' => self.line += 1,
                b'\r' if self.body.get(self.pos + 1) != Some(&b'\n') => self.line += 1,
                _ => {}
            }
            self.pos += 1;
        }
        self.line
    }
}

fn csv_row(headers: &[String], row: &csv::ByteRecord) -> Result<Value, String> {
    if row.len() != headers.len() {
        return Err(format!(
            "row has {} fields but the header names {}",
            row.len(),
            headers.len()
        ));
    }
    let mut obj = Map::new();
    let mut metadata = Map::new();
    for (column, (name, cell)) in headers.iter().zip(row.iter()).enumerate() {
        let cell =
            std::str::from_utf8(cell).map_err(|_| format!("field {name:?} is not valid UTF-8"))?;
        if cell.is_empty() {
            continue;
        }
        // A value under a column the header row does not name would be
        // dropped: refuse the row instead (an unnamed column that stays
        // empty, such as a trailing comma, is fine).
        if name.is_empty() {
            return Err(format!(
                "column {} has a value but the header row names no field there",
                column + 1
            ));
        }
        if let Some(key) = name.strip_prefix("metadata.") {
            metadata.insert(key.to_string(), Value::String(cell.to_string()));
            continue;
        }
        let value = match name.as_str() {
            "timestamp" => match cell.trim().parse::<serde_json::Number>() {
                Ok(n) => Value::Number(n),
                Err(_) => Value::String(cell.to_string()),
            },
            "metadata" => serde_json::from_str::<Value>(cell)
                .map_err(|e| format!("metadata cell is not JSON: {e}"))?,
            _ => Value::String(cell.to_string()),
        };
        obj.insert(name.clone(), value);
    }
    if !metadata.is_empty() {
        match obj
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(m) => m.extend(metadata),
            _ => return Err("metadata must be an object".into()),
        }
    }
    Ok(Value::Object(obj))
}
