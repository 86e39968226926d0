"""A producer of records whose header names are arbitrary bytes, for the tests.

confluent-kafka's Producer takes header names as `str` (so always UTF-8), but the protocol allows
any bytes, and other clients send them. This one calls librdkafka's C API (the library bundled
with confluent-kafka) through ctypes: `rd_kafka_header_add` takes the name with its length and
`rd_kafka_produceva` takes an array of tagged values, so no variadic call is needed.
"""

from __future__ import annotations

import ctypes
import glob
import os

import confluent_kafka

_LIB = ctypes.CDLL(
    sorted(
        glob.glob(
            os.path.join(
                os.path.dirname(confluent_kafka.__file__),
                "..",
                "confluent_kafka.libs",
                "librdkafka*",
            )
        )
    )[0]
)
_p, _size, _ssize = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_ssize_t
for name, restype, argtypes in (
    ("rd_kafka_conf_new", _p, []),
    ("rd_kafka_conf_set", ctypes.c_int, [_p, ctypes.c_char_p, ctypes.c_char_p, _p, _size]),
    ("rd_kafka_new", _p, [ctypes.c_int, _p, _p, _size]),
    ("rd_kafka_headers_new", _p, [_size]),
    ("rd_kafka_header_add", ctypes.c_int, [_p, ctypes.c_char_p, _ssize, ctypes.c_char_p, _ssize]),
    ("rd_kafka_produceva", _p, [_p, _p, _size]),
    ("rd_kafka_error_string", ctypes.c_char_p, [_p]),
    ("rd_kafka_error_destroy", None, [_p]),
    ("rd_kafka_flush", ctypes.c_int, [_p, ctypes.c_int]),
    ("rd_kafka_destroy", None, [_p]),
):
    fn = getattr(_LIB, name)
    fn.restype, fn.argtypes = restype, argtypes


class _Mem(ctypes.Structure):
    _fields_ = [("ptr", _p), ("size", _size)]


class _Value(ctypes.Union):
    _fields_ = [("cstr", ctypes.c_char_p), ("i32", ctypes.c_int32), ("mem", _Mem), ("ptr", _p)]
    _fields_ += [("_pad", ctypes.c_char * 64)]


class _VU(ctypes.Structure):  # rd_kafka_vu_t
    _fields_ = [("vtype", ctypes.c_int), ("u", _Value)]


# rd_kafka_vtype_t
_TOPIC, _PARTITION, _VALUE, _KEY, _MSGFLAGS, _HEADERS = 1, 3, 4, 5, 7, 10
# without it librdkafka keeps pointing at the caller's value until the record is sent
_MSG_F_COPY = 0x2


class RawProducer:
    def __init__(self, bootstrap_servers: str) -> None:
        conf = _LIB.rd_kafka_conf_new()
        errstr = ctypes.create_string_buffer(512)
        for key, value in {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": "true",
            "acks": "all",
        }.items():
            if _LIB.rd_kafka_conf_set(conf, key.encode(), value.encode(), errstr, 512) != 0:
                raise RuntimeError(errstr.value.decode())
        self._rk = _LIB.rd_kafka_new(0, conf, errstr, 512)  # 0: RD_KAFKA_PRODUCER
        if not self._rk:
            raise RuntimeError(errstr.value.decode())

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[bytes, bytes | None]] | None,
        partition: int = -1,  # RD_KAFKA_PARTITION_UA: the partitioner picks
    ) -> None:
        keep = []  # the buffers must outlive the call, which copies them
        vus = (_VU * 7)()
        vus[0].vtype, vus[0].u.cstr = _TOPIC, topic.encode()
        vus[1].vtype, vus[1].u.i32 = _PARTITION, partition
        vus[2].vtype, vus[2].u.i32 = _MSGFLAGS, _MSG_F_COPY
        n = 3
        for vtype, data in ((_VALUE, value), (_KEY, key)):
            if data is not None:
                buf = ctypes.create_string_buffer(data, len(data))
                keep.append(buf)
                vus[n].vtype = vtype
                vus[n].u.mem.ptr, vus[n].u.mem.size = ctypes.cast(buf, _p), len(data)
                n += 1
        if headers is not None:
            hdrs = _LIB.rd_kafka_headers_new(max(1, len(headers)))
            for name, val in headers:
                _LIB.rd_kafka_header_add(
                    hdrs, name, len(name), val, -1 if val is None else len(val)
                )
            vus[n].vtype, vus[n].u.ptr = _HEADERS, hdrs  # owned by librdkafka from here
            n += 1
        error = _LIB.rd_kafka_produceva(self._rk, vus, n)
        if error:
            text = _LIB.rd_kafka_error_string(error).decode()
            _LIB.rd_kafka_error_destroy(error)
            raise RuntimeError(text)

    def close(self) -> None:
        if _LIB.rd_kafka_flush(self._rk, 30_000) != 0:
            raise RuntimeError("records still unsent after 30 s")
        _LIB.rd_kafka_destroy(self._rk)

    def __enter__(self) -> RawProducer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
