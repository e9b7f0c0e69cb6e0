/* Intel DSA descriptor and completion record, as the hardware reads and
 * writes them (linux/idxd.h: struct dsa_hw_desc, struct dsa_completion_record).
 *
 * We keep our own definitions instead of including <linux/idxd.h> so the
 * extension builds where the header is missing or old; when it is there, the
 * offsets and constants below are checked against it at compile time.  The
 * kernel header uses bitfields for the first two words; we use plain 32-bit
 * words with accessors, which is the same little-endian layout and lets us
 * take offsetof() of every field.
 */
#ifndef DSAMIG_DSA_HW_H
#define DSAMIG_DSA_HW_H

#include <stddef.h>
#include <stdint.h>

/* Opcodes (enum dsa_opcode). */
enum {
    DSAMIG_OP_NOOP = 0x00,
    DSAMIG_OP_BATCH = 0x01,
    DSAMIG_OP_DRAIN = 0x02,
    DSAMIG_OP_MEMMOVE = 0x03,
    DSAMIG_OP_MEMFILL = 0x04,
    DSAMIG_OP_COMPARE = 0x05,
    DSAMIG_OP_COMPVAL = 0x06,
    DSAMIG_OP_CR_DELTA = 0x07,
    DSAMIG_OP_AP_DELTA = 0x08,
    DSAMIG_OP_DUALCAST = 0x09,
    DSAMIG_OP_TRANSL_FETCH = 0x0a, /* DSA 2.0 */
    DSAMIG_OP_CRCGEN = 0x10,
    DSAMIG_OP_COPY_CRC = 0x11,
    DSAMIG_OP_DIF_CHECK = 0x12,
    DSAMIG_OP_DIF_INS = 0x13,
    DSAMIG_OP_DIF_STRP = 0x14,
    DSAMIG_OP_DIF_UPDT = 0x15,
    DSAMIG_OP_CFLUSH = 0x20,
};

/* Descriptor flags (IDXD_OP_FLAG_*), bits 23:0 of the second word. */
#define DSAMIG_FLAG_FENCE 0x0001u
#define DSAMIG_FLAG_BOF 0x0002u
#define DSAMIG_FLAG_CRAV 0x0004u
#define DSAMIG_FLAG_RCR 0x0008u
#define DSAMIG_FLAG_RCI 0x0010u
#define DSAMIG_FLAG_CRSTS 0x0020u
#define DSAMIG_FLAG_CR 0x0080u
#define DSAMIG_FLAG_CC 0x0100u
#define DSAMIG_FLAG_ADDR1_TCS 0x0200u
#define DSAMIG_FLAG_ADDR2_TCS 0x0400u
#define DSAMIG_FLAG_ADDR3_TCS 0x0800u
#define DSAMIG_FLAG_CR_TCS 0x1000u
#define DSAMIG_FLAG_STORD 0x2000u
#define DSAMIG_FLAG_DRDBK 0x4000u
#define DSAMIG_FLAG_DSTS 0x8000u
/* Every flag a DSA (not IAA) descriptor may carry; bit 6 and bits 23:16
 * are reserved. */
#define DSAMIG_FLAG_DSA_DEFINED 0xffbfu

/* Completion status (enum dsa_completion_status). */
enum {
    DSAMIG_COMP_NONE = 0x00,
    DSAMIG_COMP_SUCCESS = 0x01,
    DSAMIG_COMP_SUCCESS_PRED = 0x02,
    DSAMIG_COMP_PAGE_FAULT_NOBOF = 0x03,
    DSAMIG_COMP_PAGE_FAULT_IR = 0x04,
    DSAMIG_COMP_BATCH_FAIL = 0x05,
    DSAMIG_COMP_BATCH_PAGE_FAULT = 0x06,
    DSAMIG_COMP_DR_OFFSET_NOINC = 0x07,
    DSAMIG_COMP_DR_OFFSET_ERANGE = 0x08,
    DSAMIG_COMP_DIF_ERR = 0x09,
    DSAMIG_COMP_BAD_OPCODE = 0x10,
    DSAMIG_COMP_INVALID_FLAGS = 0x11,
    DSAMIG_COMP_NOZERO_RESERVE = 0x12,
    DSAMIG_COMP_XFER_ERANGE = 0x13,
    DSAMIG_COMP_DESC_CNT_ERANGE = 0x14,
    DSAMIG_COMP_DR_ERANGE = 0x15,
    DSAMIG_COMP_OVERLAP_BUFFERS = 0x16,
    DSAMIG_COMP_DCAST_ERR = 0x17,
    DSAMIG_COMP_DESCLIST_ALIGN = 0x18,
    DSAMIG_COMP_INT_HANDLE_INVAL = 0x19,
    DSAMIG_COMP_CRA_XLAT = 0x1a,
    DSAMIG_COMP_CRA_ALIGN = 0x1b,
    DSAMIG_COMP_ADDR_ALIGN = 0x1c,
    DSAMIG_COMP_PRIV_BAD = 0x1d,
    DSAMIG_COMP_TRAFFIC_CLASS_CONF = 0x1e,
    DSAMIG_COMP_PFAULT_RDBA = 0x1f,
    DSAMIG_COMP_HW_ERR1 = 0x20,
    DSAMIG_COMP_HW_ERR_DRB = 0x21,
    DSAMIG_COMP_TRANSLATION_FAIL = 0x22,
};
#define DSAMIG_COMP_STATUS_MASK 0x7fu
#define DSAMIG_COMP_STATUS_WRITE 0x80u

#define DSAMIG_DESC_SIZE 64
#define DSAMIG_DESC_ALIGN 64
#define DSAMIG_CR_SIZE 32
#define DSAMIG_CR_ALIGN 32

/* struct dsa_hw_desc, 64 bytes. */
typedef struct dsamig_dsa_desc {
    uint32_t pasid_priv;   /* 0x00 pasid[19:0] rsvd[30:20] priv[31]: 0 from user space */
    uint32_t flags_opcode; /* 0x04 flags[23:0] opcode[31:24] */
    uint64_t completion_addr; /* 0x08 */
    uint64_t src_addr;     /* 0x10 src_addr / pattern (MEMFILL) / desc_list_addr (BATCH) */
    uint64_t dst_addr;     /* 0x18 dst_addr / src2_addr / comp_pattern (COMPVAL) */
    uint32_t xfer_size;    /* 0x20 xfer_size / desc_count (BATCH) */
    uint16_t int_handle;   /* 0x24 */
    uint16_t rsvd1;        /* 0x26 */
    union {                /* 0x28 operation-specific */
        uint8_t expected_res;
        uint8_t op_specific[24];
    };
} __attribute__((packed)) dsamig_dsa_desc;

/* struct dsa_completion_record, 32 bytes.  The device writes the status byte
 * last; readers load it with acquire semantics before the other fields. */
typedef struct dsamig_dsa_cr {
    volatile uint8_t status; /* 0x00 bits 6:0 code, bit 7: the fault was a write */
    uint8_t result;          /* 0x01 compare: 0 equal, 1 different */
    uint16_t rsvd;           /* 0x02 */
    uint32_t bytes_completed; /* 0x04 descs_completed for a batch */
    uint64_t fault_addr;     /* 0x08 */
    union {                  /* 0x10 */
        uint32_t invalid_flags; /* bits 23:0 with INVALID_FLAGS */
        uint64_t crc_val;
        uint8_t op_specific[16];
    };
} __attribute__((packed)) dsamig_dsa_cr;

static inline uint32_t dsamig_desc_opcode(const dsamig_dsa_desc *d)
{
    return d->flags_opcode >> 24;
}

static inline uint32_t dsamig_desc_flags(const dsamig_dsa_desc *d)
{
    return d->flags_opcode & 0xffffffu;
}

static inline uint32_t dsamig_desc_word(uint32_t opcode, uint32_t flags)
{
    return (opcode << 24) | (flags & 0xffffffu);
}

_Static_assert(sizeof(dsamig_dsa_desc) == 64, "descriptor is 64 bytes");
_Static_assert(sizeof(dsamig_dsa_cr) == 32, "completion record is 32 bytes");
_Static_assert(offsetof(dsamig_dsa_desc, completion_addr) == 0x08, "completion_addr");
_Static_assert(offsetof(dsamig_dsa_desc, src_addr) == 0x10, "src_addr");
_Static_assert(offsetof(dsamig_dsa_desc, dst_addr) == 0x18, "dst_addr");
_Static_assert(offsetof(dsamig_dsa_desc, xfer_size) == 0x20, "xfer_size");
_Static_assert(offsetof(dsamig_dsa_desc, int_handle) == 0x24, "int_handle");
_Static_assert(offsetof(dsamig_dsa_desc, rsvd1) == 0x26, "rsvd1");
_Static_assert(offsetof(dsamig_dsa_desc, expected_res) == 0x28, "expected_res");
_Static_assert(offsetof(dsamig_dsa_cr, result) == 0x01, "result");
_Static_assert(offsetof(dsamig_dsa_cr, bytes_completed) == 0x04, "bytes_completed");
_Static_assert(offsetof(dsamig_dsa_cr, fault_addr) == 0x08, "fault_addr");
_Static_assert(offsetof(dsamig_dsa_cr, invalid_flags) == 0x10, "invalid_flags");

#if defined(__has_include)
#if __has_include(<linux/idxd.h>)
#include <linux/idxd.h>
#define DSAMIG_HAVE_LINUX_IDXD_H 1
_Static_assert(sizeof(struct dsa_hw_desc) == sizeof(dsamig_dsa_desc), "dsa_hw_desc size");
_Static_assert(sizeof(struct dsa_completion_record) == sizeof(dsamig_dsa_cr), "CR size");
_Static_assert(offsetof(struct dsa_hw_desc, completion_addr) ==
                   offsetof(dsamig_dsa_desc, completion_addr), "completion_addr");
_Static_assert(offsetof(struct dsa_hw_desc, src_addr) == offsetof(dsamig_dsa_desc, src_addr),
               "src_addr");
_Static_assert(offsetof(struct dsa_hw_desc, desc_list_addr) ==
                   offsetof(dsamig_dsa_desc, src_addr), "desc_list_addr");
_Static_assert(offsetof(struct dsa_hw_desc, comp_pattern) ==
                   offsetof(dsamig_dsa_desc, dst_addr), "comp_pattern");
_Static_assert(offsetof(struct dsa_hw_desc, xfer_size) == offsetof(dsamig_dsa_desc, xfer_size),
               "xfer_size");
_Static_assert(offsetof(struct dsa_hw_desc, desc_count) ==
                   offsetof(dsamig_dsa_desc, xfer_size), "desc_count");
_Static_assert(offsetof(struct dsa_hw_desc, int_handle) ==
                   offsetof(dsamig_dsa_desc, int_handle), "int_handle");
_Static_assert(offsetof(struct dsa_hw_desc, rsvd1) == offsetof(dsamig_dsa_desc, rsvd1), "rsvd1");
_Static_assert(offsetof(struct dsa_hw_desc, expected_res) ==
                   offsetof(dsamig_dsa_desc, expected_res), "expected_res");
_Static_assert(offsetof(struct dsa_completion_record, result) ==
                   offsetof(dsamig_dsa_cr, result), "result");
_Static_assert(offsetof(struct dsa_completion_record, bytes_completed) ==
                   offsetof(dsamig_dsa_cr, bytes_completed), "bytes_completed");
_Static_assert(offsetof(struct dsa_completion_record, fault_addr) ==
                   offsetof(dsamig_dsa_cr, fault_addr), "fault_addr");
_Static_assert(offsetof(struct dsa_completion_record, crc_val) ==
                   offsetof(dsamig_dsa_cr, crc_val), "crc_val");
/* The kernel's constants are other enum types: compare them as ints. */
#define SAME(a, b) ((int)(a) == (int)(b))
_Static_assert(SAME(DSAMIG_OP_BATCH, DSA_OPCODE_BATCH) && SAME(DSAMIG_OP_DRAIN, DSA_OPCODE_DRAIN) &&
                   SAME(DSAMIG_OP_MEMMOVE, DSA_OPCODE_MEMMOVE) &&
                   SAME(DSAMIG_OP_MEMFILL, DSA_OPCODE_MEMFILL) &&
                   SAME(DSAMIG_OP_COMPARE, DSA_OPCODE_COMPARE) &&
                   SAME(DSAMIG_OP_COMPVAL, DSA_OPCODE_COMPVAL) &&
                   SAME(DSAMIG_OP_CRCGEN, DSA_OPCODE_CRCGEN) &&
                   SAME(DSAMIG_OP_CFLUSH, DSA_OPCODE_CFLUSH),
               "opcodes");
_Static_assert(SAME(DSAMIG_FLAG_FENCE, IDXD_OP_FLAG_FENCE) &&
                   SAME(DSAMIG_FLAG_BOF, IDXD_OP_FLAG_BOF) &&
                   SAME(DSAMIG_FLAG_CRAV, IDXD_OP_FLAG_CRAV) &&
                   SAME(DSAMIG_FLAG_RCR, IDXD_OP_FLAG_RCR) &&
                   SAME(DSAMIG_FLAG_RCI, IDXD_OP_FLAG_RCI) &&
                   SAME(DSAMIG_FLAG_CRSTS, IDXD_OP_FLAG_CRSTS) &&
                   SAME(DSAMIG_FLAG_CR, IDXD_OP_FLAG_CR) && SAME(DSAMIG_FLAG_CC, IDXD_OP_FLAG_CC) &&
                   SAME(DSAMIG_FLAG_STORD, IDXD_OP_FLAG_STORD) &&
                   SAME(DSAMIG_FLAG_DRDBK, IDXD_OP_FLAG_DRDBK) &&
                   SAME(DSAMIG_FLAG_DSTS, IDXD_OP_FLAG_DSTS),
               "flags");
_Static_assert(SAME(DSAMIG_COMP_SUCCESS, DSA_COMP_SUCCESS) &&
                   SAME(DSAMIG_COMP_SUCCESS_PRED, DSA_COMP_SUCCESS_PRED) &&
                   SAME(DSAMIG_COMP_PAGE_FAULT_NOBOF, DSA_COMP_PAGE_FAULT_NOBOF) &&
                   SAME(DSAMIG_COMP_PAGE_FAULT_IR, DSA_COMP_PAGE_FAULT_IR) &&
                   SAME(DSAMIG_COMP_BATCH_FAIL, DSA_COMP_BATCH_FAIL) &&
                   SAME(DSAMIG_COMP_BATCH_PAGE_FAULT, DSA_COMP_BATCH_PAGE_FAULT) &&
                   SAME(DSAMIG_COMP_BAD_OPCODE, DSA_COMP_BAD_OPCODE) &&
                   SAME(DSAMIG_COMP_INVALID_FLAGS, DSA_COMP_INVALID_FLAGS) &&
                   SAME(DSAMIG_COMP_NOZERO_RESERVE, DSA_COMP_NOZERO_RESERVE) &&
                   SAME(DSAMIG_COMP_XFER_ERANGE, DSA_COMP_XFER_ERANGE) &&
                   SAME(DSAMIG_COMP_DESC_CNT_ERANGE, DSA_COMP_DESC_CNT_ERANGE) &&
                   SAME(DSAMIG_COMP_DESCLIST_ALIGN, DSA_COMP_DESCLIST_ALIGN) &&
                   SAME(DSAMIG_COMP_CRA_XLAT, DSA_COMP_CRA_XLAT) &&
                   SAME(DSAMIG_COMP_CRA_ALIGN, DSA_COMP_CRA_ALIGN) &&
                   SAME(DSAMIG_COMP_PFAULT_RDBA, DSA_COMP_PFAULT_RDBA) &&
                   SAME(DSAMIG_COMP_HW_ERR1, DSA_COMP_HW_ERR1) &&
                   SAME(DSAMIG_COMP_HW_ERR_DRB, DSA_COMP_HW_ERR_DRB) &&
                   SAME(DSAMIG_COMP_TRANSLATION_FAIL, DSA_COMP_TRANSLATION_FAIL) &&
                   SAME(DSAMIG_COMP_STATUS_MASK, DSA_COMP_STATUS_MASK) &&
                   SAME(DSAMIG_COMP_STATUS_WRITE, DSA_COMP_STATUS_WRITE),
               "status codes");
#undef SAME
#endif
#endif
#ifndef DSAMIG_HAVE_LINUX_IDXD_H
#define DSAMIG_HAVE_LINUX_IDXD_H 0
#endif

#endif
