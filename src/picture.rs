//! Model output tensors to RGB pictures, and PNG encoding with metadata.

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, Axis};

/// An 8-bit RGB picture, row-major, 3 bytes a pixel.
#[derive(Clone, Debug, PartialEq)]
pub struct Picture {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Converts every image of an NCHW batch whose values span `range` into pictures.
/// Values are mapped to [0, 1], clamped, and rounded to 8 bits like diffusers'
/// `numpy_to_pil` (`(x * 255).round()`).
pub fn from_nchw(tensor: &ArrayD<f32>, range: [f32; 2]) -> Result<Vec<Picture>> {
    let shape = tensor.shape();
    if shape.len() != 4 || shape[1] != 3 {
        bail!("expected an image tensor [batch, 3, height, width], got shape {shape:?}");
    }
    let (height, width) = (shape[2], shape[3]);
    let span = range[1] - range[0];
    if span.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        bail!("output range {range:?} is empty");
    }
    let mut pictures = Vec::with_capacity(shape[0]);
    for image in tensor.axis_iter(Axis(0)) {
        let mut rgb = Vec::with_capacity(height * width * 3);
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    let unit = ((image[[c, y, x]] - range[0]) / span).clamp(0.0, 1.0);
                    rgb.push(to_u8(unit));
                }
            }
        }
        pictures.push(Picture {
            width: width as u32,
            height: height as u32,
            rgb,
        });
    }
    Ok(pictures)
}

fn to_u8(unit: f32) -> u8 {
    if unit.is_nan() {
        0
    } else {
        (unit * 255.0).round() as u8
    }
}

impl Picture {
    /// PNG bytes; `parameters` goes into a `tEXt` chunk of that name (A1111 convention).
    pub fn to_png(&self, parameters: Option<&str>) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut bytes, self.width, self.height);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            if let Some(text) = parameters {
                if text.is_ascii() {
                    encoder.add_text_chunk("parameters".into(), text.into())?;
                } else {
                    encoder.add_itxt_chunk("parameters".into(), text.into())?;
                }
            }
            let mut writer = encoder.write_header().context("encoding PNG header")?;
            writer
                .write_image_data(&self.rgb)
                .context("encoding PNG data")?;
            writer.finish().context("finishing PNG")?;
        }
        Ok(bytes)
    }

    /// Pictures side by side in rows of `columns`, for `--batch` grids.
    pub fn grid(pictures: &[Picture], columns: usize) -> Result<Picture> {
        let Some(first) = pictures.first() else {
            bail!("no pictures to put in a grid");
        };
        if pictures
            .iter()
            .any(|p| p.width != first.width || p.height != first.height)
        {
            bail!("pictures in a grid must have one size");
        }
        let columns = columns.clamp(1, pictures.len());
        let rows = pictures.len().div_ceil(columns);
        let (w, h) = (first.width as usize, first.height as usize);
        let grid_width = w * columns;
        let mut rgb = vec![255u8; grid_width * h * rows * 3];
        for (i, p) in pictures.iter().enumerate() {
            let (gx, gy) = ((i % columns) * w, (i / columns) * h);
            for y in 0..h {
                let src = &p.rgb[y * w * 3..(y + 1) * w * 3];
                let start = ((gy + y) * grid_width + gx) * 3;
                rgb[start..start + w * 3].copy_from_slice(src);
            }
        }
        Ok(Picture {
            width: grid_width as u32,
            height: (h * rows) as u32,
            rgb,
        })
    }
}

/// Reads the `parameters` text of a PNG written by [`Picture::to_png`].
pub fn read_parameters(png_bytes: &[u8]) -> Result<Option<String>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = decoder.read_info().context("reading PNG")?;
    let info = reader.info();
    if let Some(chunk) = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
    {
        return Ok(Some(chunk.text.clone()));
    }
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == "parameters") {
        return Ok(Some(chunk.get_text()?));
    }
    Ok(None)
}

/// Decodes a PNG written by edgegen (8-bit RGB) back into a picture.
pub fn decode_png(png_bytes: &[u8]) -> Result<Picture> {
    let decoded = image::load_from_memory_with_format(png_bytes, image::ImageFormat::Png)
        .context("decoding PNG")?
        .to_rgb8();
    Ok(Picture {
        width: decoded.width(),
        height: decoded.height(),
        rgb: decoded.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_range_and_rounds() {
        let t =
            ArrayD::from_shape_vec(vec![1, 3, 1, 2], vec![-1.0, 1.0, 0.0, 2.0, -3.0, 0.5]).unwrap();
        let p = &from_nchw(&t, [-1.0, 1.0]).unwrap()[0];
        assert_eq!(p.rgb, vec![0, 128, 0, 255, 255, 191]);
    }

    #[test]
    fn png_round_trip_keeps_parameters() {
        let p = Picture {
            width: 2,
            height: 1,
            rgb: vec![1, 2, 3, 4, 5, 6],
        };
        let bytes = p.to_png(Some("a red apple\nSteps: 4")).unwrap();
        assert_eq!(
            read_parameters(&bytes).unwrap().as_deref(),
            Some("a red apple\nSteps: 4")
        );
        assert_eq!(decode_png(&bytes).unwrap(), p);
    }

    #[test]
    fn grid_places_pictures() {
        let a = Picture {
            width: 1,
            height: 1,
            rgb: vec![1, 1, 1],
        };
        let b = Picture {
            width: 1,
            height: 1,
            rgb: vec![2, 2, 2],
        };
        let g = Picture::grid(&[a, b.clone(), b], 2).unwrap();
        assert_eq!((g.width, g.height), (2, 2));
        assert_eq!(g.rgb, vec![1, 1, 1, 2, 2, 2, 2, 2, 2, 255, 255, 255]);
    }
}
