"""Operations: the command line, `dicomai status`, and the storage SCU behind `dicomai send`."""
