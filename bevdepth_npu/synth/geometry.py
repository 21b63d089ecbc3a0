"""Small rigid-body helpers for the synthetic nuScenes: rotations, quaternions, boxes, clipping.

Conventions follow nuScenes: quaternions are (w, x, y, z); a pose (R, t) maps points of the child
frame into the parent frame, p_parent = R @ p_child + t; box sizes are (width, length, height)
with the length along the box's x axis (its heading). Imported by the other synth modules.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np


def rot_x(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def rot_y(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_z(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def yaw_quaternion(yaw_rad: float) -> List[float]:
    """(w, x, y, z) of a rotation by ``yaw_rad`` about z."""
    return [math.cos(yaw_rad / 2.0), 0.0, 0.0, math.sin(yaw_rad / 2.0)]


def matrix_to_quaternion(rotation: np.ndarray) -> List[float]:
    """(w, x, y, z) of a rotation matrix, with w >= 0 so that the result is unique."""
    m = np.asarray(rotation, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    # pick the largest diagonal term to divide by: numerically safe for every rotation
    if trace > 0.0:
        s = math.sqrt(trace + 1.0) * 2.0
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2.0
        q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s]
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2.0
        q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s]
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2.0
        q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s]
    norm = math.sqrt(sum(v * v for v in q))
    q = [v / norm for v in q]
    if q[0] < 0.0:
        q = [-v for v in q]
    return q


def quaternion_to_matrix(q: Sequence[float]) -> np.ndarray:
    w, x, y, z = (float(v) for v in q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


# Box faces: name, axis (0 x/length, 1 y/width, 2 z/height), sign of the outward normal.
BOX_FACES: Tuple[Tuple[str, int, float], ...] = (
    ("front", 0, 1.0), ("back", 0, -1.0), ("left", 1, 1.0), ("right", 1, -1.0),
    ("top", 2, 1.0), ("bottom", 2, -1.0),
)


def face_polygons_local(size_wlh: Sequence[float]) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(face name, 4x3 corner loop, outward unit normal) of a box centred at the origin."""
    w, l, h = size_wlh
    half = np.array([l / 2.0, w / 2.0, h / 2.0])
    loop = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))
    faces = []
    for name, axis, sign in BOX_FACES:
        others = [a for a in range(3) if a != axis]
        corners = np.zeros((4, 3))
        for i, (sb, sc) in enumerate(loop):
            corners[i, axis] = sign * half[axis]
            corners[i, others[0]] = sb * half[others[0]]
            corners[i, others[1]] = sc * half[others[1]]
        normal = np.zeros(3)
        normal[axis] = sign
        faces.append((name, corners, normal))
    return faces


def clip_polygon(points: np.ndarray, planes: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a convex 3-D polygon (n x 3) to the half-spaces
    ``a*x + b*y + c*z + d >= 0`` given as rows (a, b, c, d) of ``planes``; may return 0 rows."""
    poly = [np.asarray(p, dtype=np.float64) for p in points]
    for plane in planes:
        if not poly:
            break
        normal, offset = plane[:3], plane[3]
        dist = [float(np.dot(normal, p) + offset) for p in poly]
        out = []
        for i in range(len(poly)):
            j = (i + 1) % len(poly)
            p, q, dp, dq = poly[i], poly[j], dist[i], dist[j]
            if dp >= 0.0:
                out.append(p)
            if (dp >= 0.0) != (dq >= 0.0):
                out.append(p + (q - p) * (dp / (dp - dq)))
        poly = out
    return np.array(poly).reshape(-1, 3)


def polygon_area(uv: np.ndarray) -> float:
    """Area of a simple 2-D polygon (shoelace)."""
    if len(uv) < 3:
        return 0.0
    u, v = uv[:, 0], uv[:, 1]
    return 0.5 * abs(float(np.dot(u, np.roll(v, -1)) - np.dot(v, np.roll(u, -1))))
