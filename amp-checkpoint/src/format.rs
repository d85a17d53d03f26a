//! The file format: safetensors tensors plus one JSON metadata entry, and
//! the parser that checks a file against its own metadata. Loading and
//! [`inspect`](crate::inspect) both go through [`decode`].

use std::collections::HashMap;

use amp_core::{
    AmpConfig, AmpError, AmpState, BaseState, DType, GroupState, HostTensor, LossScaleState,
    OptimizerState, Result,
};
use safetensors::tensor::{Metadata, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::codec::{self, Encoded};
use crate::{corrupt, FORMAT_VERSION, METADATA_KEY};

/// The JSON metadata of a checkpoint.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format_version: u32,
    dtype: DType,
    shapes: Vec<Vec<usize>>,
    steps: u64,
    skipped_steps: u64,
    config: AmpConfig,
    groups: Vec<GroupState>,
    base: BaseMeta,
    /// The loss scale, when the run scales its loss (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scale: Option<LossScaleState>,
}

/// The base optimiser: what it is and its settings, with the names of its
/// buffers (stored as tensors) and values.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseMeta {
    kind: String,
    settings: Vec<(String, f64)>,
    buffers: Vec<BufferMeta>,
    scalars: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BufferMeta {
    name: String,
    present: Vec<bool>,
}

fn param_name(index: usize) -> String {
    format!("param.{index}")
}

fn buffer_name(buffer: usize, index: usize) -> String {
    format!("optimizer.{buffer}.{index}")
}

fn scalar_name(index: usize) -> String {
    format!("optimizer_scalars.{index}")
}

/// Serialises weights of `dtype` and an optimiser state.
pub(crate) fn encode(dtype: DType, params: &[HostTensor], state: &AmpState) -> Result<Vec<u8>> {
    let n = params.len();
    let mut tensors: Vec<(String, Encoded)> = Vec::new();
    for (i, tensor) in params.iter().enumerate() {
        tensors.push((param_name(i), Encoded::new(tensor)?));
    }
    let base = &state.base;
    let mut buffers = Vec::with_capacity(base.state.buffers.len());
    for (b, (name, list)) in base.state.buffers.iter().enumerate() {
        if list.len() != n {
            return Err(AmpError::CountMismatch {
                what: "optimizer state tensors",
                expected: n,
                found: list.len(),
            });
        }
        for (i, tensor) in list.iter().enumerate() {
            if let Some(tensor) = tensor {
                tensors.push((buffer_name(b, i), Encoded::new(tensor)?));
            }
        }
        buffers.push(BufferMeta {
            name: name.clone(),
            present: list.iter().map(Option::is_some).collect(),
        });
    }
    let mut scalars = Vec::with_capacity(base.state.scalars.len());
    for (s, (name, values)) in base.state.scalars.iter().enumerate() {
        let tensor = HostTensor::new(vec![values.len()], DType::F64, values.clone())?;
        tensors.push((scalar_name(s), Encoded::new(&tensor)?));
        scalars.push(name.clone());
    }
    let meta = Meta {
        format_version: FORMAT_VERSION,
        dtype,
        shapes: params.iter().map(|p| p.shape().to_vec()).collect(),
        steps: state.steps,
        skipped_steps: state.skipped_steps,
        config: state.config.clone(),
        groups: state.groups.clone(),
        base: BaseMeta {
            kind: base.kind.clone(),
            settings: base.settings.clone(),
            buffers,
            scalars,
        },
        loss_scale: state.loss_scale,
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| AmpError::Checkpoint(format!("cannot encode the metadata: {e}")))?;
    // One metadata key only: safetensors writes its metadata map in hash
    // order, and a single entry keeps the bytes deterministic.
    let metadata = Some(HashMap::from([(METADATA_KEY.to_string(), json)]));
    safetensors::tensor::serialize(
        tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)),
        metadata,
    )
    .map_err(|e| AmpError::Checkpoint(format!("cannot serialise: {e}")))
}

/// A checkpoint read back: weights and state, every value decoded to the
/// host, every part checked against the file's metadata.
pub(crate) struct Parsed {
    /// The dtype the metadata names; every parameter and buffer tensor has it.
    pub(crate) dtype: DType,
    pub(crate) params: Vec<HostTensor>,
    pub(crate) state: AmpState,
}

/// Parses and checks checkpoint bytes.
pub(crate) fn decode(bytes: &[u8]) -> Result<Parsed> {
    check_offsets(bytes)?;
    let (header_len, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| corrupt(format!("not a valid safetensors file ({e})")))?;
    let data = header_len
        .checked_add(8)
        .and_then(|start| bytes.get(start..))
        .ok_or_else(|| corrupt("the header runs past the end of the file"))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| {
            corrupt(format!(
                "no `{METADATA_KEY}` metadata: not written by amp's checkpoints"
            ))
        })?;
    let value: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| corrupt(format!("the metadata is not valid JSON ({e})")))?;
    // The version first, so that another version gets a clear message
    // rather than a schema error.
    let version = value
        .get("format_version")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| corrupt("the metadata has no `format_version`"))?;
    if version == 1 {
        return Err(corrupt(
            "format version 1 (amp 0.1) is not supported: it does not record the base \
             optimiser's settings, so it cannot be checked against this optimiser; this build \
             reads version 2",
        ));
    }
    if version != u64::from(FORMAT_VERSION) {
        return Err(corrupt(format!(
            "format version {version} is not supported: this build reads version \
             {FORMAT_VERSION}"
        )));
    }
    let meta: Meta =
        serde_json::from_value(value).map_err(|e| corrupt(format!("invalid metadata ({e})")))?;
    let file = File {
        header,
        data,
        dtype: meta.dtype,
        seen: std::cell::Cell::new(0),
    };

    let n = meta.shapes.len();
    let params = (0..n)
        .map(|i| file.tensor(&param_name(i), &meta.shapes[i]))
        .collect::<Result<Vec<_>>>()?;
    let mut state = OptimizerState::default();
    for (b, buffer) in meta.base.buffers.iter().enumerate() {
        if buffer.present.len() != n {
            return Err(AmpError::CountMismatch {
                what: "checkpoint optimizer state tensors",
                expected: n,
                found: buffer.present.len(),
            });
        }
        let list = buffer
            .present
            .iter()
            .enumerate()
            .map(|(i, &present)| {
                present
                    .then(|| file.tensor(&buffer_name(b, i), &meta.shapes[i]))
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        state.buffers.push((buffer.name.clone(), list));
    }
    for (s, name) in meta.base.scalars.iter().enumerate() {
        state
            .scalars
            .push((name.clone(), file.scalars(&scalar_name(s))?));
    }
    file.check_tensor_count()?;
    Ok(Parsed {
        dtype: meta.dtype,
        params,
        state: AmpState {
            config: meta.config,
            groups: meta.groups,
            steps: meta.steps,
            skipped_steps: meta.skipped_steps,
            base: BaseState {
                kind: meta.base.kind,
                settings: meta.base.settings,
                state,
            },
            loss_scale: meta.loss_scale,
        },
    })
}

/// Checks the header's data offsets against the file's length before the
/// safetensors parser sees them, so that no crafted offsets can make its
/// arithmetic overflow.
fn check_offsets(bytes: &[u8]) -> Result<()> {
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("the file is shorter than a safetensors header"))?;
    let header_len = usize::try_from(u64::from_le_bytes(prefix))
        .ok()
        .filter(|&len| len <= bytes.len() - 8)
        .ok_or_else(|| corrupt("the header runs past the end of the file"))?;
    let data_len = bytes.len() - 8 - header_len;
    let header: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len])
            .map_err(|e| corrupt(format!("the header is not valid JSON ({e})")))?;
    for (name, entry) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry
            .get("data_offsets")
            .and_then(serde_json::Value::as_array)
            .filter(|o| o.len() == 2)
            .ok_or_else(|| corrupt(format!("tensor `{name}` has no data offsets")))?;
        for offset in offsets {
            match offset.as_u64() {
                Some(offset) if offset <= data_len as u64 => {}
                _ => {
                    return Err(corrupt(format!(
                        "tensor `{name}` has a data offset {offset} beyond the file's {data_len} \
                         data bytes"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// The tensors of a parsed file, looked up by name.
struct File<'a> {
    header: Metadata,
    data: &'a [u8],
    dtype: DType,
    /// Tensors looked up so far, to catch unexpected extra ones.
    seen: std::cell::Cell<usize>,
}

impl File<'_> {
    fn view(&self, name: &str, shape: &[usize]) -> Result<(safetensors::Dtype, &[u8])> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| corrupt(format!("tensor `{name}` is missing")))?;
        if info.shape != shape {
            return Err(corrupt(format!(
                "tensor `{name}` has shape {:?}, but the metadata says {shape:?}",
                info.shape
            )));
        }
        let (start, end) = info.data_offsets;
        let bytes = self
            .data
            .get(start..end)
            .ok_or_else(|| corrupt(format!("tensor `{name}` lies outside the file")))?;
        self.seen.set(self.seen.get() + 1);
        Ok((info.dtype, bytes))
    }

    /// Decodes a parameter or buffer tensor, which must have `shape` and the
    /// dtype the metadata names.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<HostTensor> {
        let (dtype, bytes) = self.view(name, shape)?;
        let dtype = codec::dtype_of(dtype).ok_or_else(|| {
            corrupt(format!(
                "tensor `{name}` has dtype {dtype:?}; only F16, BF16, F32 and F64 are supported"
            ))
        })?;
        if dtype != self.dtype {
            return Err(corrupt(format!(
                "tensor `{name}` is {dtype}, but the metadata says the store is {}",
                self.dtype
            )));
        }
        HostTensor::new(shape.to_vec(), dtype, codec::decode(dtype, bytes))
    }

    /// Decodes a 1-d `F64` tensor of host-side values.
    fn scalars(&self, name: &str) -> Result<Vec<f64>> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| corrupt(format!("tensor `{name}` is missing")))?;
        if info.dtype != safetensors::Dtype::F64 || info.shape.len() != 1 {
            return Err(corrupt(format!("tensor `{name}` must be a 1-d F64 tensor")));
        }
        let shape = info.shape.clone();
        let (_, bytes) = self.view(name, &shape)?;
        Ok(codec::decode(DType::F64, bytes))
    }

    /// Every tensor of the file must have been looked up: an extra one means
    /// the file is not what its metadata says.
    fn check_tensor_count(&self) -> Result<()> {
        let total = self.header.tensors().len();
        if total == self.seen.get() {
            Ok(())
        } else {
            Err(corrupt(format!(
                "the file holds {total} tensors, but its metadata accounts for {}",
                self.seen.get()
            )))
        }
    }
}
