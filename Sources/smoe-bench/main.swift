import SMoECompress
print(BLAS.coreName)
