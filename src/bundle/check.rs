//! A quick integrity check of a bundle's model files, for `models list` and
//! the retained `models` message: the protobuf framing of each ONNX file and
//! of its graph (which finds truncated and overwritten files without reading
//! the weights: lengths are skipped, not read), and the graph inputs the
//! pipelines need, with their ranks. Loading a model checks everything else;
//! this only has to be fast enough to run over every bundle on a small board.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// An input the graph declares: its name and, when declared, its dimensions
/// (`None` for a symbolic one such as `batch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphInput {
    pub name: String,
    pub dims: Option<Vec<Option<i64>>>,
}

impl GraphInput {
    pub fn rank(&self) -> Option<usize> {
        self.dims.as_ref().map(Vec::len)
    }
}

/// `ModelProto.graph`.
const MODEL_GRAPH: u64 = 7;
/// `GraphProto.input`.
const GRAPH_INPUT: u64 = 11;
/// A declared input is a few hundred bytes; more means the framing is wrong.
const MAX_VALUE_INFO: u64 = 1 << 20;

/// The inputs an ONNX file's graph declares, after checking the framing of
/// the model and of the graph.
pub fn onnx_inputs(path: &Path) -> Result<Vec<GraphInput>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let mut reader = Reader {
        inner: BufReader::new(file),
        pos: 0,
    };
    scan_model(&mut reader, len).map_err(|err| anyhow!("{}: {err:#}", path.display()))
}

fn scan_model<R: Read + Seek>(reader: &mut Reader<R>, len: u64) -> Result<Vec<GraphInput>> {
    if len == 0 {
        bail!("empty file, not an ONNX model");
    }
    let mut graph = None;
    walk(reader, len, |reader, field, size| {
        if field == MODEL_GRAPH {
            graph = Some((reader.pos, size));
        }
        reader.skip(size)
    })
    .context("not a complete ONNX model")?;
    let Some((start, size)) = graph else {
        bail!("not an ONNX model: it has no graph");
    };
    reader.seek_to(start)?;
    let mut inputs = Vec::new();
    walk(reader, start + size, |reader, field, size| {
        if field != GRAPH_INPUT {
            return reader.skip(size);
        }
        if size > MAX_VALUE_INFO {
            bail!("graph input record of {size} bytes");
        }
        let mut bytes = vec![0; size as usize];
        reader.read_exact(&mut bytes)?;
        inputs.push(value_info(&bytes).context("malformed graph input")?);
        Ok(())
    })
    .context("the graph is damaged")?;
    Ok(inputs)
}

/// A reader that knows its offset.
struct Reader<R> {
    inner: BufReader<R>,
    pos: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn byte(&mut self) -> Result<u8> {
        let mut b = [0u8];
        self.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner
            .read_exact(buf)
            .map_err(|e| anyhow!("at byte {}: {e}", self.pos))?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let n_signed = i64::try_from(n).map_err(|_| anyhow!("length {n} out of range"))?;
        self.inner.seek_relative(n_signed)?;
        self.pos += n;
        Ok(())
    }

    fn seek_to(&mut self, pos: u64) -> Result<()> {
        self.inner.seek(std::io::SeekFrom::Start(pos))?;
        self.pos = pos;
        Ok(())
    }

    fn varint(&mut self) -> Result<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        bail!("malformed varint before byte {}", self.pos)
    }
}

/// Walks the fields of one message that ends at `end`; `on_len` sees each
/// length-delimited field (number and size) and must consume exactly its bytes.
fn walk<R: Read + Seek>(
    reader: &mut Reader<R>,
    end: u64,
    mut on_len: impl FnMut(&mut Reader<R>, u64, u64) -> Result<()>,
) -> Result<()> {
    while reader.pos < end {
        let at = reader.pos;
        let key = reader.varint()?;
        let field = key >> 3;
        if field == 0 {
            bail!("field number 0 at byte {at}");
        }
        match key & 7 {
            0 => {
                reader.varint()?;
            }
            1 => reader.skip(8)?,
            5 => reader.skip(4)?,
            2 => {
                let size = reader.varint()?;
                if size > end.saturating_sub(reader.pos) {
                    bail!(
                        "field {field} at byte {at} claims {size} bytes, but only {} are left (truncated?)",
                        end.saturating_sub(reader.pos)
                    );
                }
                on_len(reader, field, size)?;
            }
            wire => bail!("invalid wire type {wire} at byte {at}"),
        }
        if reader.pos > end {
            bail!("field at byte {at} runs past the end (truncated?)");
        }
    }
    Ok(())
}

/// A field of an in-memory message.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of a small message held in memory.
fn fields(mut bytes: &[u8]) -> Result<Vec<(u64, Value<'_>)>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = slice_varint(&mut bytes)?;
        let value = match key & 7 {
            0 => Value::Varint(slice_varint(&mut bytes)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                bytes = bytes.get(n..).ok_or_else(|| anyhow!("truncated field"))?;
                Value::Fixed
            }
            2 => {
                let size = usize::try_from(slice_varint(&mut bytes)?)?;
                let (head, rest) = (bytes.get(..size), bytes.get(size..));
                let (Some(head), Some(rest)) = (head, rest) else {
                    bail!("truncated field");
                };
                bytes = rest;
                Value::Bytes(head)
            }
            wire => bail!("invalid wire type {wire}"),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

fn slice_varint(bytes: &mut &[u8]) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes
            .split_first()
            .ok_or_else(|| anyhow!("truncated varint"))?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("malformed varint")
}

/// The only length-delimited field `number` of a message, if present.
fn sub_message<'a>(fields: &[(u64, Value<'a>)], number: u64) -> Option<&'a [u8]> {
    fields.iter().find_map(|(n, v)| match v {
        Value::Bytes(b) if *n == number => Some(*b),
        _ => None,
    })
}

/// `ValueInfoProto { name = 1; type = 2 }`, `TypeProto { tensor_type = 1 }`,
/// `Tensor { elem_type = 1; shape = 2 }`, `TensorShapeProto { dim = 1 }`,
/// `Dimension { dim_value = 1 | dim_param = 2 }`.
fn value_info(bytes: &[u8]) -> Result<GraphInput> {
    let info = fields(bytes)?;
    let name = sub_message(&info, 1)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let shape = match sub_message(&info, 2) {
        Some(ty) => match sub_message(&fields(ty)?, 1) {
            Some(tensor) => sub_message(&fields(tensor)?, 2),
            None => None,
        },
        None => None,
    };
    let dims = match shape {
        Some(shape) => {
            let mut dims = Vec::new();
            for (number, value) in fields(shape)? {
                if let (1, Value::Bytes(dim)) = (number, value) {
                    let value = fields(dim)?.into_iter().find_map(|(n, v)| match v {
                        Value::Varint(d) if n == 1 => Some(d as i64),
                        _ => None,
                    });
                    dims.push(value);
                }
            }
            Some(dims)
        }
        None => None,
    };
    Ok(GraphInput { name, dims })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(relative: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }

    #[test]
    fn reads_the_inputs_of_a_real_unet() {
        let inputs =
            onnx_inputs(&fixture("tests/fixtures/bundles/tiny-sd/unet/model.onnx")).unwrap();
        let sample = inputs.iter().find(|i| i.name == "sample").expect("sample");
        assert_eq!(sample.rank(), Some(4), "{inputs:?}");
        let states = inputs
            .iter()
            .find(|i| i.name == "encoder_hidden_states")
            .expect("encoder_hidden_states");
        assert_eq!(states.rank(), Some(3), "{inputs:?}");
    }

    #[test]
    fn truncated_and_overwritten_files_are_found() {
        let bytes = std::fs::read(fixture(
            "tests/fixtures/bundles/tiny-sd/vae_decoder/model.onnx",
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let truncated = dir.path().join("truncated.onnx");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", onnx_inputs(&truncated).unwrap_err());
        assert!(err.contains("truncated"), "{err}");
        let garbage = dir.path().join("garbage.onnx");
        let mut overwritten = bytes.clone();
        overwritten[..64].fill(0xff);
        std::fs::write(&garbage, &overwritten).unwrap();
        assert!(onnx_inputs(&garbage).is_err());
        let empty = dir.path().join("empty.onnx");
        std::fs::write(&empty, b"").unwrap();
        assert!(onnx_inputs(&empty).is_err());
    }
}
