// Pure pixel work of the page: the map from its 8-bit PNG, the heat overlay, the
// percentile mask, its outline and the box of its largest component. No DOM here
// beyond decoding, so each step says exactly what the server's Python counterpart does.

/** The jet colour table of service/client/overlay.py: 256 x RGB. */
export const JET = (() => {
  const table = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const x = i / 255;
    [3, 2, 1].forEach((offset, c) => {
      const v = Math.min(Math.max(1.5 - Math.abs(4 * x - offset), 0), 1);
      table[i * 3 + c] = Math.round(v * 255);
    });
  }
  return table;
})();

/** Decode a base64 PNG to its pixels, untouched by colour management. */
export async function decodePng(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
    colorSpaceConversion: "none",
    premultiplyAlpha: "none",
  });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  return ctx.getImageData(0, 0, bitmap.width, bitmap.height);
}

/** The gray levels (0..255) of a decoded 8-bit map: one byte per pixel. */
export function grayLevels(imageData) {
  const { data, width, height } = imageData;
  const levels = new Uint8Array(width * height);
  for (let i = 0; i < levels.length; i++) levels[i] = data[i * 4];
  return levels;
}

/** A level back to the map's value: value_min + level / 255 * (value_max - value_min). */
export function levelValue(level, map) {
  return map.value_min + (level / 255) * (map.value_max - map.value_min);
}

/**
 * The p-th percentile of the levels with linear interpolation between ranks, as
 * numpy.percentile computes it; from a histogram, so it costs one pass.
 */
export function percentile(levels, p) {
  const counts = new Uint32Array(256);
  for (const v of levels) counts[v]++;
  const rank = (p / 100) * (levels.length - 1);
  const at = (k) => {
    let seen = 0;
    for (let v = 0; v < 256; v++) {
      seen += counts[v];
      if (seen > k) return v;
    }
    return 255;
  };
  const lo = Math.floor(rank);
  const hi = Math.ceil(rank);
  return at(lo) + (at(hi) - at(lo)) * (rank - lo);
}

/**
 * Pixels strictly above the p-th percentile of the map, as the server's threshold mask
 * (service/engine/masks/threshold.py). Levels are monotone in the map's values, so the
 * percentile of the levels is the level of the percentile.
 */
export function thresholdMask(levels, p) {
  const cut = percentile(levels, p);
  return levels.map((v) => (v > cut ? 1 : 0));
}

/** The mask of a decoded 1-bit PNG (foreground is white). */
export function maskOfPng(imageData) {
  return grayLevels(imageData).map((v) => (v > 127 ? 1 : 0));
}

/** The heat map over the image, alpha-blended: RGBA of width x height. */
export function overlay(image, levels, alpha, width, height) {
  const out = new ImageData(width, height);
  for (let i = 0; i < levels.length; i++) {
    const j = levels[i] * 3;
    for (let c = 0; c < 3; c++) {
      out.data[i * 4 + c] = (1 - alpha) * image.data[i * 4 + c] + alpha * JET[j + c];
    }
    out.data[i * 4 + 3] = 255;
  }
  return out;
}

/**
 * The mask's outline: its pixels with a 4-neighbour outside it or on the image's edge,
 * as opaque `colour`, everything else transparent.
 */
export function outline(mask, width, height, colour) {
  const out = new ImageData(width, height);
  const inside = (x, y) => x >= 0 && y >= 0 && x < width && y < height && mask[y * width + x];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (!mask[y * width + x]) continue;
      if (inside(x - 1, y) && inside(x + 1, y) && inside(x, y - 1) && inside(x, y + 1)) continue;
      out.data.set([...colour, 255], (y * width + x) * 4);
    }
  }
  return out;
}

/**
 * The inclusive bounding box of the mask's largest 8-connected component, as the
 * server's box ({x_min, y_min, x_max, y_max}), or null for an empty mask.
 */
export function largestBox(mask, width, height) {
  const label = new Int32Array(mask.length);
  const stack = new Int32Array(mask.length);
  let best = null;
  let bestSize = 0;
  let next = 0;
  for (let start = 0; start < mask.length; start++) {
    if (!mask[start] || label[start]) continue;
    next++;
    let top = 0;
    let size = 0;
    const box = { x_min: width, y_min: height, x_max: -1, y_max: -1 };
    stack[top++] = start;
    label[start] = next;
    while (top > 0) {
      const i = stack[--top];
      const x = i % width;
      const y = (i - x) / width;
      size++;
      box.x_min = Math.min(box.x_min, x);
      box.x_max = Math.max(box.x_max, x);
      box.y_min = Math.min(box.y_min, y);
      box.y_max = Math.max(box.y_max, y);
      for (let dy = -1; dy <= 1; dy++) {
        for (let dx = -1; dx <= 1; dx++) {
          const nx = x + dx;
          const ny = y + dy;
          if (nx < 0 || ny < 0 || nx >= width || ny >= height) continue;
          const n = ny * width + nx;
          if (mask[n] && !label[n]) {
            label[n] = next;
            stack[top++] = n;
          }
        }
      }
    }
    if (size > bestSize) {
      bestSize = size;
      best = box;
    }
  }
  return best;
}
