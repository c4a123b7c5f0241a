#ifndef SMOE_CHDF5_SHIM_H
#define SMOE_CHDF5_SHIM_H
#include <hdf5.h>

/* HDF5's type, property-class and flag macros expand to globals or expressions that
   Swift cannot import; these inline wrappers make them callable. Each triggers H5open(). */
static inline hid_t    smoe_T_NATIVE_FLOAT(void)   { return H5T_NATIVE_FLOAT; }
static inline hid_t    smoe_T_NATIVE_DOUBLE(void)  { return H5T_NATIVE_DOUBLE; }
static inline hid_t    smoe_T_NATIVE_INT32(void)   { return H5T_NATIVE_INT32; }
static inline hid_t    smoe_T_NATIVE_INT64(void)   { return H5T_NATIVE_INT64; }
static inline hid_t    smoe_T_NATIVE_UINT16(void)  { return H5T_NATIVE_UINT16; }
static inline hid_t    smoe_T_IEEE_F32LE(void)     { return H5T_IEEE_F32LE; }
static inline hid_t    smoe_T_IEEE_F64LE(void)     { return H5T_IEEE_F64LE; }
static inline hid_t    smoe_T_STD_I32LE(void)      { return H5T_STD_I32LE; }
static inline hid_t    smoe_T_STD_I64LE(void)      { return H5T_STD_I64LE; }
static inline hid_t    smoe_T_STD_U16LE(void)      { return H5T_STD_U16LE; }
static inline hid_t    smoe_T_C_S1(void)           { return H5T_C_S1; }
static inline size_t   smoe_T_VARIABLE(void)       { return H5T_VARIABLE; }
static inline hid_t    smoe_P_DATASET_CREATE(void) { return H5P_DATASET_CREATE; }
static inline hid_t    smoe_P_LINK_CREATE(void)    { return H5P_LINK_CREATE; }
static inline hid_t    smoe_P_OBJECT_COPY(void)    { return H5P_OBJECT_COPY; }
static inline hid_t    smoe_P_FILE_ACCESS(void)    { return H5P_FILE_ACCESS; }
static inline unsigned smoe_F_ACC_TRUNC(void)      { return H5F_ACC_TRUNC; }
static inline unsigned smoe_F_ACC_EXCL(void)       { return H5F_ACC_EXCL; }
static inline unsigned smoe_F_ACC_RDONLY(void)     { return H5F_ACC_RDONLY; }
static inline unsigned smoe_F_ACC_RDWR(void)       { return H5F_ACC_RDWR; }
static inline hid_t    smoe_E_DEFAULT(void)        { return H5E_DEFAULT; }

/* IEEE binary16, little endian: the layout numpy/h5py call float16. */
static inline hid_t smoe_make_f16le(void) {
    hid_t t = H5Tcopy(H5T_IEEE_F32LE);
    H5Tset_fields(t, 15, 10, 5, 0, 10);
    H5Tset_size(t, 2);
    H5Tset_ebias(t, 15);
    return t;
}

/* Silence HDF5's automatic error-stack printing: the tool reports its own one-line errors. */
static inline void smoe_silence_errors(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

#endif
