//! Helpers shared by the checkpoint tests.

use amp::checkpoint;

/// Rewrites the checkpoint's JSON metadata, keeping its tensors.
pub fn edit_metadata(bytes: &[u8], edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let file = safetensors::SafeTensors::deserialize(bytes).expect("valid file");
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).expect("valid file");
    let mut meta: serde_json::Value = serde_json::from_str(
        &header.metadata().as_ref().expect("metadata")[checkpoint::METADATA_KEY],
    )
    .expect("json");
    edit(&mut meta);
    let metadata = Some(std::collections::HashMap::from([(
        checkpoint::METADATA_KEY.to_string(),
        meta.to_string(),
    )]));
    safetensors::serialize(file.tensors(), metadata).expect("serialise")
}
