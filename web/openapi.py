"""The OpenAPI 3 document of `/api` (tests check it against the app's routes and the
limits they enforce).

Every limit in it comes from where it is enforced: the engine's (``search.limits``) and
the app's settings (``API_MAX_K``, ``DEFAULT_K``, ``MAX_UPLOAD_BYTES``), never restated.
"""

from __future__ import annotations

from typing import Any

from xmodal.crossmodal.calibration import LABEL_BANDS, WEAK
from xmodal.search.engine import ImageFilter
from xmodal.search.limits import DEFAULT_RERANK_K, MAX_K, MAX_QUERY_CHARS, MAX_RERANK_K

from . import DEFAULTS, MAX_CATALOG_ID
from .service import THUMBNAIL_SIZE


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(schema_ref: str, description: str = "OK") -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_ref}"}}},
    }


def openapi_document(
    max_k: int = DEFAULTS["API_MAX_K"],
    default_k: int = DEFAULTS["DEFAULT_K"],
    max_upload_bytes: int = DEFAULTS["MAX_UPLOAD_BYTES"],
) -> dict[str, Any]:
    """The document, with the server's k limit and default and its upload limit."""
    k_schema = {"type": "integer", "minimum": 1, "maximum": max_k, "default": default_k}
    rerank_k_schema = {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_RERANK_K,
        "default": DEFAULT_RERANK_K,
    }
    k = {
        "name": "k",
        "in": "query",
        "required": False,
        "description": "Number of results.",
        "schema": k_schema,
    }
    offset_schema = {"type": "integer", "minimum": 0, "maximum": MAX_K - 1, "default": 0}
    offset = {
        "name": "offset",
        "in": "query",
        "required": False,
        "description": f"Results of the same ranking to skip (the next page is the response's "
        f"next_offset); offset + k may not exceed {MAX_K}.",
        "schema": offset_schema,
    }
    min_score = {
        "name": "min_score",
        "in": "query",
        "required": False,
        "description": "Drop results scoring below this cosine similarity.",
        "schema": {"type": "number"},
    }
    rerank = {
        "name": "rerank",
        "in": "query",
        "required": False,
        "description": "1: re-score the top rerank_k with the cross-attention reranker "
        "(default when the model has one); 0: dual encoder only.",
        "schema": {"type": "integer", "enum": [0, 1]},
    }
    rerank_k = {
        "name": "rerank_k",
        "in": "query",
        "required": False,
        "description": "How many dual-encoder candidates the reranker re-scores.",
        "schema": rerank_k_schema,
    }
    date = "an ISO date (2019-07-14) or date-time (UTC unless it says otherwise)"
    filter_schemas: dict[str, dict[str, Any]] = {
        "folder": {
            "type": "string",
            "description": "Only images under this folder: relative to an indexed folder "
            "(trips/2019), or an absolute path inside one; whole path components.",
        },
        "type": {
            "type": "string",
            "description": "Only these image types, comma-separated: "
            f"{', '.join(ImageFilter.known_types())} (jpg and tif too).",
        },
        "taken_after": {
            "type": "string",
            "description": f"Only images taken on or after this, {date}. The date taken is "
            "EXIF DateTimeOriginal (else DateTime), else the file's modification time.",
        },
        "taken_before": {
            "type": "string",
            "description": f"Only images taken before this (exclusive), {date}.",
        },
        "min_width": {
            "type": "integer",
            "minimum": 1,
            "description": "Only images at least this many pixels wide.",
        },
    }
    filters = [
        {"name": name, "in": "query", "required": False, "schema": schema}
        for name, schema in filter_schemas.items()
    ]
    image_id = {
        "name": "image_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_CATALOG_ID},
    }
    not_found = _error("No indexed image with that id, or its file cannot be served.")
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "xmodal search API",
            "version": "1",
            "description": "Text-to-image and image-to-text search over an index bundle.",
        },
        "paths": {
            "/api/search": {
                "get": {
                    "summary": "Images best matching a text",
                    "parameters": [
                        {
                            "name": "q",
                            "in": "query",
                            "required": True,
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": MAX_QUERY_CHARS,
                            },
                        },
                        k,
                        offset,
                        min_score,
                        rerank,
                        rerank_k,
                        *filters,
                    ],
                    "responses": {
                        "200": _json("Results"),
                        "400": _error(
                            "Bad parameter (empty or too long q, k out of range, a bad filter)."
                        ),
                    },
                }
            },
            "/api/search/image": {
                "post": {
                    "summary": "Images or captions best matching an uploaded image",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {
                                        "image": {
                                            "type": "string",
                                            "format": "binary",
                                            "description": "The image file, at most "
                                            f"{max_upload_bytes:,} bytes.",
                                            "maxLength": max_upload_bytes,
                                        },
                                        "target": {
                                            "type": "string",
                                            "enum": ["images", "captions"],
                                            "default": "images",
                                        },
                                        "k": k_schema,
                                        "offset": offset_schema,
                                        "min_score": {"type": "number"},
                                        "rerank": {"type": "integer", "enum": [0, 1]},
                                        "rerank_k": rerank_k_schema,
                                        **filter_schemas,
                                    },
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json("Results"),
                        "400": _error("Missing or undecodable image, or a bad parameter."),
                        "413": _error(
                            f"The image file is larger than the server's upload limit of "
                            f"{max_upload_bytes:,} bytes (xmodal serve --max-upload-mb; a "
                            "file of exactly the limit passes)."
                        ),
                    },
                }
            },
            "/api/images/{image_id}": {
                "get": {
                    "summary": "An image's path, metadata and linked captions",
                    "parameters": [image_id],
                    "responses": {"200": _json("ImageDetails"), "404": not_found},
                }
            },
            "/api/images/{image_id}/similar": {
                "get": {
                    "summary": "Images most similar to an indexed image ('more like this')",
                    "parameters": [image_id, k, offset],
                    "responses": {"200": _json("Results"), "404": not_found},
                }
            },
            "/api/images/{image_id}/thumbnail": {
                "get": {
                    "summary": f"A thumbnail (WebP, at most {THUMBNAIL_SIZE} pixels a side)",
                    "parameters": [image_id],
                    "responses": {
                        "200": {
                            "description": "The thumbnail",
                            "content": {"image/webp": {}},
                        },
                        "404": not_found,
                    },
                }
            },
            "/api/images/{image_id}/file": {
                "get": {
                    "summary": "The original image file",
                    "parameters": [image_id],
                    "responses": {
                        "200": {"description": "The file", "content": {"image/*": {}}},
                        "404": not_found,
                    },
                }
            },
            "/api/stats": {
                "get": {
                    "summary": "Model, counts, index types, last run and failures",
                    "responses": {
                        "200": {
                            "description": "Bundle status",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/api/health": {
                "get": {
                    "summary": "Liveness",
                    "responses": {
                        "200": {
                            "description": "Up",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Health"}
                                }
                            },
                        }
                    },
                }
            },
            "/api/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                },
                "Result": {
                    "type": "object",
                    "required": ["id", "score"],
                    "properties": {
                        "id": {"type": "integer"},
                        "score": {"type": "number"},
                        "path": {"type": "string"},
                        "caption": {"type": "string"},
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                        "cosine": {"type": "number", "description": "dual score, if reranked"},
                        "match": {"type": "number", "description": "reranker score"},
                        "best_caption": {
                            "type": "string",
                            "description": "images: the linked caption closest to the query",
                        },
                        "match_probability": {
                            "type": "number",
                            "description": "text -> image: how likely the image matches (0-1), "
                            "where the model is calibrated (xmodal calibrate); in ranking order",
                        },
                        "match_label": {
                            "type": "string",
                            "enum": [label for label, _ in LABEL_BANDS] + [WEAK],
                            "description": "the band of match_probability",
                        },
                    },
                },
                "Results": {
                    "type": "object",
                    "required": ["query", "offset", "next_offset", "results"],
                    "properties": {
                        "query": {},
                        "offset": {"type": "integer", "description": "results skipped"},
                        "next_offset": {
                            "type": "integer",
                            "nullable": True,
                            "description": "the offset of the next page; null on the last",
                        },
                        "good_match": {
                            "type": "boolean",
                            "nullable": True,
                            "description": "text -> image: whether the first result is "
                            "labelled a match (null where the model is not calibrated)",
                        },
                        "filters": {
                            "type": "object",
                            "description": "image results: the filters in force, as parsed "
                            "(type as a list, dates in ISO form)",
                        },
                        "results": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Result"},
                        },
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "generation"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok"]},
                        "generation": {"type": "integer", "description": "being served"},
                        "model": {"type": "string"},
                        "reranker": {"type": "string", "nullable": True},
                        "refresh_problem": {
                            "type": "string",
                            "nullable": True,
                            "description": "why a newer published manifest is not served "
                            "(the last good generation stays in service)",
                        },
                    },
                },
                "ImageDetails": {
                    "type": "object",
                    "required": ["id", "path"],
                    "properties": {
                        "id": {"type": "integer"},
                        "path": {"type": "string"},
                        "relpath": {"type": "string", "description": "inside its indexed root"},
                        "width": {"type": "integer", "nullable": True},
                        "height": {"type": "integer", "nullable": True},
                        "bytes": {"type": "integer"},
                        "format": {"type": "string", "nullable": True},
                        "sha256": {"type": "string", "nullable": True},
                        "captions": {"type": "array", "items": {"type": "object"}},
                    },
                },
            }
        },
    }
