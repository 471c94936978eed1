//! Weights stored in the layout tract's matrix kernels read, mapped from a
//! file instead of packed at every start.
//!
//! A warm start from the portable (NNEF) cache still copies every weight out
//! of the file and then packs it into fresh pages: memory traffic, most of a
//! warm start. The packed bytes of one plan are written once, page-aligned,
//! next to its graph; later starts map that file and hand tract a matrix input
//! whose panels point into the mapping, so the page cache is the only copy.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use tract_linalg::mmm::{
    EagerPackedInput, MMMInputFormat, MMMInputValue, PackedExoticFact, PackedMatrixStorage,
};
use tract_linalg::pack::PackedFormat;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::ExoticFact;

const PAGE: u64 = 4096;

/// Where one weight's packed bytes are and what they were packed for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PackedEntry {
    /// The unpacked weight's shape, which its stand-in in the graph keeps.
    pub shape: Vec<usize>,
    pub offset: u64,
    pub bytes: u64,
    pub panel_bytes: usize,
    pub mn: usize,
    pub k: usize,
    /// The packing format as tract prints it: kernel width, alignment and
    /// padding all show, so a plan packed for other kernels is refused.
    pub format: String,
}

/// The index of a packed-weights file: NNEF variable label → entry.
pub type PackedIndex = BTreeMap<String, PackedEntry>;

/// A packed weight from this plan's codegen, to be written to the file.
pub struct PackedWeight {
    pub label: String,
    pub shape: Vec<usize>,
    pub value: Arc<Tensor>,
}

/// The single plain packed matrix a pack op made of a weight, if it is one
/// this file can hold (float32, tract's plain panel format).
fn eager(value: &Tensor) -> Option<&EagerPackedInput> {
    let storage = value.storage_as::<PackedMatrixStorage>()?;
    let [single] = storage.values() else {
        return None;
    };
    let eager = single.downcast_ref::<EagerPackedInput>()?;
    let format = eager.fact.format.downcast_ref::<PackedFormat>()?;
    (format.dt == f32::datum_type()).then_some(eager)
}

/// True when `value` (a pack op's output) can be written by [`write`].
pub fn is_storable(value: &Tensor) -> bool {
    eager(value).is_some()
}

/// Size of the file [`write`] makes of `weights`.
pub fn file_bytes(weights: &[PackedWeight]) -> u64 {
    weights
        .iter()
        .filter_map(|w| eager(&w.value))
        .map(|eager| (eager.packed.len() as u64).div_ceil(PAGE) * PAGE)
        .sum()
}

/// Writes the packed bytes, each at a page boundary, and returns the index.
pub fn write(out: &mut dyn Write, weights: &[PackedWeight]) -> Result<PackedIndex> {
    let mut index = PackedIndex::new();
    let mut offset = 0u64;
    let zeros = [0u8; PAGE as usize];
    for weight in weights {
        let eager = eager(&weight.value).context("not a plain packed matrix")?;
        let bytes = &eager.packed[..];
        out.write_all(bytes)?;
        index.insert(
            weight.label.clone(),
            PackedEntry {
                shape: weight.shape.clone(),
                offset,
                bytes: bytes.len() as u64,
                panel_bytes: eager.panel_bytes,
                mn: eager.mn,
                k: eager.fact.k,
                format: format!("{:?}", eager.fact.format),
            },
        );
        let end = offset + bytes.len() as u64;
        offset = end.div_ceil(PAGE) * PAGE;
        out.write_all(&zeros[..(offset - end) as usize])?;
    }
    Ok(index)
}

/// A packed-weights file mapped into memory, with its index.
pub struct MappedWeights {
    map: Arc<Mmap>,
    index: PackedIndex,
}

impl MappedWeights {
    /// Maps `path`, faulting every page in now (from the page cache, in one
    /// call) rather than one by one during the first run.
    pub fn open(path: &Path, index: PackedIndex) -> Result<MappedWeights> {
        let file = File::open(path).with_context(|| format!("{}", path.display()))?;
        // SAFETY: cache files are replaced by rename, never rewritten in place,
        // so the mapped bytes do not change under the mapping.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .with_context(|| format!("mapping {}", path.display()))?;
        for (label, entry) in &index {
            ensure!(
                entry.offset % PAGE == 0 && entry.offset + entry.bytes <= map.len() as u64,
                "{}: entry {label} lies outside the file",
                path.display()
            );
        }
        Ok(MappedWeights {
            map: Arc::new(map),
            index,
        })
    }

    pub fn labels(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The packed tensor for `label`, as a pack op packing for `format` with
    /// these sizes would have made it.
    pub fn tensor(&self, label: &str, request: &PackRequest) -> Result<Tensor> {
        let PackRequest {
            format,
            k,
            mn,
            shape,
        } = *request;
        let entry = self
            .index
            .get(label)
            .with_context(|| format!("no packed weight {label}"))?;
        let wanted = format!("{format:?}");
        if entry.format != wanted || entry.k != k || entry.mn != mn {
            bail!(
                "packed weight {label} is {} k={} mn={}, the plan wants {wanted} k={k} mn={mn}",
                entry.format,
                entry.k,
                entry.mn
            );
        }
        let panels = mn.div_ceil(format.r());
        ensure!(
            panels * entry.panel_bytes <= entry.bytes as usize,
            "packed weight {label}: {} bytes for {panels} panels of {}",
            entry.bytes,
            entry.panel_bytes
        );
        let value = MappedPacked {
            fact: PackedExoticFact {
                format: tract_onnx::tract_core::dyn_clone::clone_box(format),
                mn: mn.to_dim(),
                k,
            },
            map: self.map.clone(),
            offset: entry.offset as usize,
            panel_bytes: entry.panel_bytes,
            mn,
        };
        let storage = PackedMatrixStorage::new_batched(shape, tvec![Box::new(value) as _]);
        Ok(storage.into_tensor(f32::datum_type()))
    }
}

/// What a pack op asks for: its format, the matrix's sizes and the (unit)
/// batch shape of its output.
pub struct PackRequest<'a> {
    pub format: &'a dyn MMMInputFormat,
    pub k: usize,
    pub mn: usize,
    pub shape: &'a [usize],
}

/// One weight's panels inside the mapped file.
#[derive(Clone)]
struct MappedPacked {
    fact: PackedExoticFact,
    map: Arc<Mmap>,
    offset: usize,
    panel_bytes: usize,
    mn: usize,
}

impl MMMInputValue for MappedPacked {
    fn format(&self) -> &dyn MMMInputFormat {
        &*self.fact.format
    }
    fn scratch_panel_buffer_layout(&self) -> Option<std::alloc::Layout> {
        None
    }
    fn panel_bytes(&self, i: usize, _buffer: Option<*mut u8>) -> TractResult<*const u8> {
        ensure!(
            i < self.panels_count(),
            "panel {i} of {}",
            self.panels_count()
        );
        Ok(self.map[self.offset + i * self.panel_bytes..].as_ptr())
    }
    fn mn(&self) -> usize {
        self.mn
    }
    fn k(&self) -> usize {
        self.fact.k
    }
    fn exotic_fact(&self) -> &dyn ExoticFact {
        &self.fact
    }
    fn extract_at_mn_f16(&self, _mn: usize, _slice: &mut [f16]) -> TractResult<()> {
        bail!("a mapped packed weight is read by its kernel only")
    }
    fn extract_at_mn_f32(&self, _mn: usize, _slice: &mut [f32]) -> TractResult<()> {
        bail!("a mapped packed weight is read by its kernel only")
    }
}

impl PartialEq for MappedPacked {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.map, &other.map) && self.offset == other.offset
    }
}

impl Eq for MappedPacked {}

impl Hash for MappedPacked {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.offset.hash(state);
        self.panel_bytes.hash(state);
        self.mn.hash(state);
    }
}

impl fmt::Display for MappedPacked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Mapped {} tensor (mn={} k={})",
            self.fact.format, self.mn, self.fact.k
        )
    }
}

impl fmt::Debug for MappedPacked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
